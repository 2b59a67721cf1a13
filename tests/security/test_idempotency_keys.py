"""``Idempotency-Key`` on every POST (issue 19, deliverable 4; ``marketplace.common.idempotency``).

A client that lost a reply sends the request again with the same key: it gets the first answer
and nothing happens twice. The key is its sender's alone, bound to one request, and forgotten
after the retention period.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.response import Response

from hivemart_core.api import Client
from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.services import api_key_create
from marketplace.common.idempotency import Claim, idempotency_begin, idempotency_finish, idempotency_records_purge
from marketplace.common.models import IdempotencyRecord
from marketplace.common.views import APIView
from marketplace.jobs.models import Job
from marketplace.ledger.models import Account
from marketplace.ledger.services import credit_grant
from marketplace.receipts.models import Ticket
from tests.marketplace.factories import make_model, make_user, make_wallet
from tests.marketplace.settlement import planned_job
from tests.security.helpers import api, assert_error_shape

pytestmark = pytest.mark.django_db


def _post(user: User | None, path: str, body: Any = None, key: str | None = None) -> Any:
    extra = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
    return api(user).post(path, body if body is not None else {}, format="json", **extra)


def _job_body(model_id: str, budget: int = 1_000) -> dict[str, Any]:
    return {"kind": "inference", "model": model_id, "budget": budget, "max_price": 5}


# --- replays ----------------------------------------------------------------------------------


def test_a_retried_ticket_renewal_replays_the_first_tickets() -> None:
    pj = planned_job(backups=1)
    path = f"/api/jobs/{pj.job.pk}/tickets/renew/"
    before = Ticket.objects.filter(job=pj.job).count()
    first = _post(pj.client, path, key="renew-1")
    assert first.status_code == 200, first.content
    issued = Ticket.objects.filter(job=pj.job).count() - before
    assert issued == len(first.json()) > 0
    again = _post(pj.client, path, key="renew-1")
    assert again.status_code == 200 and again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert Ticket.objects.filter(job=pj.job).count() == before + issued
    # Another key is another renewal: the key, not chance, is what held the count.
    assert _post(pj.client, path, key="renew-2").json() != first.json()
    assert Ticket.objects.filter(job=pj.job).count() == before + 2 * issued


def _api_keys(user: User) -> int:
    """Keys created through ``POST /api/keys/`` (the test client's own keys have no name)."""
    return ApiKey.objects.filter(user=user).exclude(name="").count()


def _jobs(user: User) -> int:
    return Job.objects.filter(user=user).count()


# (path, body, rows) for POSTs whose repetition would create rows.
CASES: dict[str, Callable[[User], tuple[str, dict[str, Any], Callable[[], int]]]] = {
    "api-key": lambda user: ("/api/keys/", {"name": "laptop"}, lambda: _api_keys(user)),
    "job": lambda user: ("/api/jobs/", _job_body(make_model().model_id), lambda: _jobs(user)),
    "payout-less grant": lambda user: (
        "/api/ledger/grants/",
        {"username": make_wallet().user.username, "amount": 5},
        lambda: IdempotencyRecord.objects.filter(status=201).count(),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_retry_replays_the_answer_and_creates_nothing(case: str) -> None:
    user = make_wallet(user=make_user(is_staff=True), credits=10**6).user
    path, body, rows = CASES[case](user)
    before = rows()
    first = _post(user, path, body, key="k-1")
    assert first.status_code == 201, first.content
    assert rows() == before + 1
    again = _post(user, path, body, key="k-1")
    assert (again.status_code, again.json()) == (201, first.json())
    assert rows() == before + 1


def test_a_replayed_grant_moves_credits_once_although_its_body_has_no_key() -> None:
    staff, wallet = make_user(is_staff=True), make_wallet()
    body = {"username": wallet.user.username, "amount": 700}
    assert _post(staff, "/api/ledger/grants/", body, key="g").status_code == 201
    assert _post(staff, "/api/ledger/grants/", body, key="g").status_code == 201
    wallet.refresh_from_db()
    assert wallet.balance == 700


# --- what a key is bound to --------------------------------------------------------------------


def test_the_same_key_with_another_request_is_409() -> None:
    user = make_user()
    assert _post(user, "/api/keys/", {"name": "a"}, key="k").status_code == 201
    for path, body in (("/api/keys/", {"name": "b"}), ("/api/keys/?x=1", {"name": "a"})):
        error = assert_error_shape(_post(user, path, body, key="k"), 409, "idempotency_key_reused")
        assert error["extra"] == {"header": "Idempotency-Key", "key": "k"}
    assert _api_keys(user) == 1


def test_two_users_keys_never_meet() -> None:
    alice, bob = make_user(), make_user()
    mine = _post(alice, "/api/keys/", {"name": "a"}, key="shared")
    theirs = _post(bob, "/api/keys/", {"name": "a"}, key="shared")
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["key"] != theirs.json()["key"] and "Idempotent-Replayed" not in theirs
    assert theirs.json()["username"] == bob.username
    # Another body under Bob's key conflicts with Bob's own request only.
    assert _post(alice, "/api/keys/", {"name": "other"}, key="shared").status_code == 409
    assert (_api_keys(alice), _api_keys(bob)) == (1, 1)


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", " padded", "caf\xe9"])
def test_a_malformed_key_is_a_400_naming_the_header(key: str) -> None:
    user = make_user()
    error = assert_error_shape(_post(user, "/api/keys/", {"name": "a"}, key=key), 400, "invalid")
    assert error["extra"] == {"header": "Idempotency-Key"}
    assert _api_keys(user) == 0
    assert _post(user, "/api/keys/", {"name": "a"}, key="k" * 255).status_code == 201  # the longest


def test_anonymous_posts_are_not_keyed() -> None:
    # Sign-up has no owner to scope a key by: the same key signs up two accounts.
    for name in ("anna", "anton"):
        response = _post(None, "/api/auth/signup/", {"username": name, "password": "x" * 16}, key="same")
        assert response.status_code == 201, response.content
    assert not IdempotencyRecord.objects.exists()
    assert_error_shape(_post(None, "/api/auth/signup/", {"username": "ada"}, key="k" * 256), 400, "invalid")


# --- what is stored, and for how long -----------------------------------------------------------


def test_an_answer_that_depends_on_state_is_not_replayed() -> None:
    user, model = make_wallet(credits=100).user, make_model()
    body = _job_body(model.model_id, budget=1_000)
    assert_error_shape(_post(user, "/api/jobs/", body, key="j"), 402, "insufficient_credits")
    credit_grant(account=Account.objects.get(kind=Account.Kind.WALLET, user=user), amount=10_000)
    assert _post(user, "/api/jobs/", body, key="j").status_code == 201  # the retry ran again
    # A request-determined 4xx is replayed as it was.
    bad = _post(user, "/api/jobs/", {**body, "budget": -1}, key="bad")
    assert bad.status_code == 400
    again = _post(user, "/api/jobs/", {**body, "budget": -1}, key="bad")
    assert (again.status_code, again.json(), again["Idempotent-Replayed"]) == (400, bad.json(), "true")


def test_a_server_error_releases_the_key() -> None:
    claim = idempotency_begin(scope="user:1", key="k", fingerprint="f" * 64)
    idempotency_finish(claim, Response({"code": "server_error"}, status=500))
    assert not IdempotencyRecord.objects.exists()
    assert isinstance(idempotency_begin(scope="user:1", key="k", fingerprint="f" * 64), Claim)  # taken afresh


def test_a_key_in_flight_is_409_until_its_holder_is_presumed_dead(settings: Any) -> None:
    user = make_user()
    assert _post(user, "/api/keys/", {"name": "a"}, key="k").status_code == 201
    record = IdempotencyRecord.objects.get()
    IdempotencyRecord.objects.filter(pk=record.pk).update(status=None, body=None)  # as while it runs
    assert_error_shape(_post(user, "/api/keys/", {"name": "a"}, key="k"), 409, "idempotency_in_progress")
    assert _api_keys(user) == 1
    dead = timezone.now() - timedelta(seconds=settings.HIVEMART_IDEMPOTENCY_LOCK_S + 1)
    IdempotencyRecord.objects.filter(pk=record.pk).update(locked_at=dead)
    assert _post(user, "/api/keys/", {"name": "a"}, key="k").status_code == 201  # taken over, run again
    assert _api_keys(user) == 2
    assert IdempotencyRecord.objects.get().status == 201


def test_keys_expire_after_the_retention_period(settings: Any) -> None:
    user = make_user()
    assert _post(user, "/api/keys/", {"name": "a"}, key="old").status_code == 201
    assert _post(user, "/api/keys/", {"name": "a"}, key="new").status_code == 201
    retention = timedelta(seconds=settings.HIVEMART_IDEMPOTENCY_RETENTION_S)
    IdempotencyRecord.objects.filter(key="old").update(created_at=timezone.now() - retention - timedelta(seconds=1))
    # An expired key counts as new even before housekeeping removes it ...
    assert _post(user, "/api/keys/", {"name": "b"}, key="old").status_code == 201
    assert _api_keys(user) == 3
    # ... and housekeeping removes exactly the expired ones.
    assert idempotency_records_purge() == 0
    assert idempotency_records_purge(now=timezone.now() + retention + timedelta(seconds=1)) == 2
    assert not IdempotencyRecord.objects.exists()


# --- every POST route, and the SDK end to end -----------------------------------------------------


def _api_views(patterns: list[Any], prefix: str = "") -> list[tuple[str, type]]:
    found: list[tuple[str, type]] = []
    for p in patterns:
        if isinstance(p, URLResolver):
            found += _api_views(p.url_patterns, prefix + str(p.pattern))
        elif isinstance(p, URLPattern) and hasattr(p.callback, "cls"):
            found.append((prefix + str(p.pattern), p.callback.cls))
    return found


def test_every_api_post_route_honours_the_key() -> None:
    posts = [(route, cls) for route, cls in _api_views(get_resolver().url_patterns) if route.startswith("api/")]
    posts = [(route, cls) for route, cls in posts if hasattr(cls, "post")]
    assert len(posts) >= 20
    assert [route for route, cls in posts if not issubclass(cls, APIView)] == []


class _LosesFirstReplyTo(httpx.BaseTransport):
    """Delivers requests to the app, but drops the reply to the first POST to ``path``: the
    server acted, the client saw a broken connection."""

    def __init__(self, inner: httpx.BaseTransport, path: str) -> None:
        self.inner, self.path, self.lost = inner, path, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == self.path and not self.lost:
            response.read()
            self.lost += 1
            raise httpx.ReadError("connection reset after the server answered", request=request)
        return response


def test_a_lost_renewal_reply_retried_by_the_sdk_issues_one_set_of_tickets(wsgi: httpx.WSGITransport) -> None:
    pj = planned_job(backups=1)
    path = f"/api/jobs/{pj.job.pk}/tickets/renew/"
    transport = _LosesFirstReplyTo(wsgi, path)
    client = Client(
        api_key=api_key_create(user=pj.client).raw, base_url="http://testserver", transport=transport, max_retries=2
    )
    client._core._sleep = lambda _: None
    before = Ticket.objects.filter(job=pj.job).count()
    renewed = client.jobs.renew_tickets(pj.job.pk)
    assert transport.lost == 1  # the first reply really was lost, and the call still succeeded
    assert Ticket.objects.filter(job=pj.job).count() == before + len(renewed)
    current = {t.ticket["ticket_id"] for t in client.jobs.tickets(pj.job.pk)}
    assert {t.ticket["ticket_id"] for t in renewed} == current
