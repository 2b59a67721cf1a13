"""``Idempotency-Key`` on every POST of the API: a retried request acts once.

A client that lost the reply to a POST cannot tell whether it acted; it sends the request
again with the same key and gets the first answer back, replayed from this table, instead of
a second job, payout or set of tickets. The contract, for every POST under ``/api/``:

- The key is 1 to 255 printable ASCII characters; anything else is a 400 naming the header.
- Keys are scoped per authenticated user (``user:<id>``, as the ledger's keys): two users'
  equal keys never meet. Anonymous POSTs (sign-up) are not keyed: the header is checked and
  otherwise ignored, since without an owner a replay could hand one caller another's answer.
- The same key with another request (method, path, query or body differ by one byte) is a
  409 ``idempotency_key_reused``.
- While the first request runs, a second with its key is a 409 ``idempotency_in_progress``
  at once (no waiting: the SDK backs off and retries it). A request that has held its key for
  ``HIVEMART_IDEMPOTENCY_LOCK_S`` without answering is presumed dead and may be run again.
- Answers that a retry would get anyway are stored and replayed (status and JSON body, with
  the ``Idempotent-Replayed: true`` header): 2xx, and the 4xx that depend on the request
  alone (``STORED_CLIENT_ERRORS``). Server errors and the 4xx that depend on state or time
  (401, 402, 403, 409, 429) are not: the key is released and a retry runs the view again.
- A key is remembered for ``HIVEMART_IDEMPOTENCY_RETENTION_S`` (24 h by default); after
  that it counts as new. ``idempotency_records_purge`` deletes the expired rows (a periodic
  task of the scheduler calls it).

Services keep their own, durable keys where money moves (job creation, grants, payouts,
settlement): this layer answers retries within the retention window without running the view
at all; those catch a retry after it, and the services' callers inside the platform.

A crash between the view's commit and the recording of its answer leaves the key held; the
retry after ``HIVEMART_IDEMPOTENCY_LOCK_S`` then runs the view again. The views whose effects
must not double (job creation, payouts, grants) are keyed in their services too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http.request import RawPostDataException
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder

from marketplace.common.errors import Conflict, IdempotencyConflict, ValidationFailed
from marketplace.common.models import IdempotencyRecord

logger = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_MAX = 255
_KEY = re.compile(rf"[\x20-\x7e]{{1,{KEY_MAX}}}")
# Client errors decided by the request alone: a retry would get the same answer, so replaying it
# is faithful. The others depend on state (402 credits, 409 conflicts), on who asks (401, 403)
# or on time (408, 429): a retry runs again and may succeed.
STORED_CLIENT_ERRORS = frozenset({400, 404, 405, 413, 415, 422})


class IdempotencyKeyReused(IdempotencyConflict):
    """The key was already used for a different request by the same user."""

    code = "idempotency_key_reused"


class IdempotencyInProgress(Conflict):
    """The first request with this key has not answered yet; retry later."""

    code = "idempotency_in_progress"


class Replay(Exception):  # noqa: N818 - not an error: the stored answer, raised past the view
    """Raised by :func:`idempotency_begin` when the key already has an answer."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"replay of a stored {status} answer")
        self.status, self.body = status, body

    def response(self) -> Response:
        return Response(self.body, status=self.status, headers={REPLAYED_HEADER: "true"})


@dataclass(frozen=True)
class Claim:
    """A key this request holds: the row and the ``locked_at`` it wrote (a request that took
    over a dead one's key writes a newer one, and only the holder may record or release)."""

    record_id: int
    locked_at: datetime


def request_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (None without one). ValidationFailed, naming the
    header, when it is not 1 to 255 printable ASCII characters."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not _KEY.fullmatch(key) or key != key.strip():
        raise ValidationFailed(
            f"the {HEADER} header is 1 to {KEY_MAX} printable ASCII characters, without surrounding spaces",
            extra={"header": HEADER},
        )
    return key


def request_fingerprint(request: Request) -> str:
    """sha256 over method, path with query string, and body bytes: what "the same request" means."""
    try:
        body = request._request.body
    except RawPostDataException:  # something read the stream first: hash what it parsed
        body = json.dumps(request.data, sort_keys=True, cls=JSONEncoder).encode()
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.get_full_path().encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _expired_before(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.HIVEMART_IDEMPOTENCY_RETENTION_S)


def idempotency_begin(*, scope: str, key: str, fingerprint: str) -> Claim:
    """Take ``key`` in ``scope`` for a request with ``fingerprint``, or say why not: Replay
    (an answer is stored), IdempotencyKeyReused, IdempotencyInProgress."""
    for _ in range(3):  # each pass either decides or removes what stood in the way
        now = timezone.now()
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(scope=scope, key=key, fingerprint=fingerprint, locked_at=now)
            return Claim(record.pk, now)
        except IntegrityError:
            pass
        record = IdempotencyRecord.objects.filter(scope=scope, key=key).first()
        if record is None:  # purged or released since our insert failed
            continue
        if record.created_at < _expired_before(now):
            IdempotencyRecord.objects.filter(pk=record.pk, created_at=record.created_at).delete()
            continue
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                f"this {HEADER} was used for a different request", extra={"header": HEADER, "key": key}
            )
        if record.status is not None:
            raise Replay(record.status, record.body)
        if record.locked_at > now - timedelta(seconds=settings.HIVEMART_IDEMPOTENCY_LOCK_S):
            raise IdempotencyInProgress(
                f"a request with this {HEADER} is still running; retry shortly", extra={"header": HEADER, "key": key}
            )
        # The holder died without answering: take the key over (one taker wins the update).
        taken = IdempotencyRecord.objects.filter(pk=record.pk, locked_at=record.locked_at, status__isnull=True)
        if taken.update(locked_at=now) == 1:
            return Claim(record.pk, now)
    raise IdempotencyInProgress(
        f"a request with this {HEADER} is racing this one; retry shortly", extra={"header": HEADER, "key": key}
    )


def _held(claim: Claim) -> Any:
    return IdempotencyRecord.objects.filter(pk=claim.record_id, locked_at=claim.locked_at, status__isnull=True)


def idempotency_finish(claim: Claim, response: Response) -> None:
    """Record ``response`` for replay if a retry would deserve it, else release the key."""
    status = response.status_code
    if not (200 <= status < 300 or status in STORED_CLIENT_ERRORS):
        idempotency_release(claim)
        return
    # Stored as it will be sent: through DRF's encoder (datetimes, decimals) and back.
    body = json.loads(json.dumps(response.data, cls=JSONEncoder))
    _held(claim).update(status=status, body=body)


def idempotency_release(claim: Claim) -> None:
    """Forget the key (the request failed in a way a retry should run again)."""
    _held(claim).delete()


def idempotency_records_purge(*, now: datetime | None = None) -> int:
    """Delete the keys older than the retention period; returns how many. Housekeeping."""
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=_expired_before(now or timezone.now())).delete()
    return deleted
