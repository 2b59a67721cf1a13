"""Job tickets: the marketplace's signed permission for one provider to bill one job.

The marketplace issues a ticket per provider of a job's plan (primaries and backups) and
signs it with its Ed25519 platform key. A provider serves billable RPCs only with a ticket
that verifies against the platform key it trusts, names it, covers the requested blocks,
has not expired and still has work units left. The ticket also binds the client's job key,
which countersigns receipts, and the price, which fixes what a work unit costs.

Canonical form: the signed bytes are ``TICKET_DOMAIN`` followed by the JSON of every field
but ``signature``, with sorted keys and no spaces. JSON (not msgpack) so that any language
can reproduce the bytes; integers only, so there is no float formatting to disagree on.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.identity import Identity, is_valid_public_key, verify_signature

__all__ = [
    "TICKET_DOMAIN",
    "JobTicket",
    "TicketError",
    "issue_ticket",
    "verify_ticket",
    "canonical_json",
    "TICKET_ID_PATTERN",
    "PEER_ID_PATTERN",
    "HEX64_PATTERN",
    "NO_CLIENT_KEY",
    "field_int",
    "field_str",
]

TICKET_DOMAIN = b"hivemart-ticket/1\n"
TICKET_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
PEER_ID_PATTERN = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")  # base58btc
HEX64_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_INT = 2**62
# The client_key of a ticket whose job has no client key: a point of small order, so that no
# countersignature ever verifies against it (verify_signature refuses such keys).
NO_CLIENT_KEY = "00" * 32
# A provider's clock may run a little behind or ahead of the marketplace's.
CLOCK_SKEW_S = 30


class TicketError(ProtocolError):
    """A ticket that does not allow the request. ``code`` says why:

    ``bad_ticket`` (malformed), ``ticket_signature`` (not signed by the platform key),
    ``ticket_expired``, ``ticket_wrong_provider``, ``ticket_blocks`` (request outside the
    ticket's blocks), ``ticket_exhausted`` (no work units left), ``ticket_required``.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code)


def canonical_json(body: dict[str, Any]) -> bytes:
    """The one byte string a signature over ``body`` covers."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def field_int(
    data: dict[str, Any],
    key: str,
    *,
    low: int = 0,
    high: int = _MAX_INT,
    error: type = TicketError,
    code: str = "bad_ticket",
) -> int:
    value = data.get(key)
    if type(value) is not int or not low <= value <= high:
        raise error(f"'{key}' must be an integer in [{low}, {high}]", code=code)
    return value


def field_str(
    data: dict[str, Any],
    key: str,
    pattern: re.Pattern[str],
    what: str,
    *,
    error: type = TicketError,
    code: str = "bad_ticket",
) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise error(f"'{key}' must be {what}", code=code)
    return value


@dataclass(frozen=True)
class JobTicket:
    """Provider ``provider_peer`` may bill job ``job_id`` for blocks [start, end) of model
    ``model_id`` at ``price`` micro-credits per million work units, up to ``max_units``
    units, until ``expires_at`` (unix seconds). ``client_key`` is the hex Ed25519 public key
    the client countersigns receipts with. ``credit_units`` is the payment channel's credit
    window: the work units the provider may serve beyond the client's last countersigned
    receipt, and the most the marketplace pays for work the client has not countersigned
    (docs/protocol.md, "Payment channel")."""

    ticket_id: str
    job_id: int
    client_key: str
    provider_peer: str
    model_id: str
    model_digest: str
    start: int
    end: int
    max_units: int
    price: int
    expires_at: int
    credit_units: int = 0
    signature: str = ""

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        del body["signature"]
        return body

    def signing_bytes(self) -> bytes:
        return TICKET_DOMAIN + canonical_json(self.body())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start < end <= self.end

    def check_covers(self, start: int, end: int) -> None:
        if not self.covers(start, end):
            raise TicketError(
                f"blocks {start}:{end} are outside the ticket's blocks {self.start}:{self.end}",
                code=codes.TICKET_BLOCKS,
            )

    @classmethod
    def from_dict(cls, data: Any) -> JobTicket:
        """Parse and type-check a ticket (no signature check: see :func:`verify_ticket`)."""
        if not isinstance(data, dict):
            raise TicketError("a ticket must be a map", code=codes.BAD_TICKET)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise TicketError(f"unknown ticket fields: {sorted(unknown)}", code=codes.BAD_TICKET)
        start = field_int(data, "start")
        end = field_int(data, "end", low=start + 1)
        max_units = field_int(data, "max_units", low=1)
        return cls(
            ticket_id=field_str(data, "ticket_id", TICKET_ID_PATTERN, "8 to 64 characters of [A-Za-z0-9_-]"),
            job_id=field_int(data, "job_id", low=1),
            client_key=_client_key(data),
            provider_peer=field_str(data, "provider_peer", PEER_ID_PATTERN, "a base58 peer id"),
            model_id=field_str(data, "model_id", _MODEL_ID, "a model id"),
            model_digest=field_str(data, "model_digest", HEX64_PATTERN, "a hex sha256 digest"),
            start=start,
            end=end,
            max_units=max_units,
            price=field_int(data, "price"),
            credit_units=field_int(data, "credit_units", low=1, high=max_units),
            expires_at=field_int(data, "expires_at"),
            signature=field_str(data, "signature", _HEX128, "a hex Ed25519 signature"),
        )


def _client_key(data: dict[str, Any]) -> str:
    key = field_str(data, "client_key", HEX64_PATTERN, "a hex Ed25519 public key")
    if key != NO_CLIENT_KEY and not is_valid_public_key(bytes.fromhex(key)):
        raise TicketError("the ticket's client_key is of small order or not canonical", code=codes.BAD_TICKET)
    return key


def issue_ticket(platform: Identity, **body: Any) -> JobTicket:
    """Sign a ticket with the platform key (the marketplace's side)."""
    unsigned = JobTicket(**body)
    signed = JobTicket(**{**unsigned.body(), "signature": platform.sign(unsigned.signing_bytes()).hex()})
    JobTicket.from_dict(signed.to_dict())  # refuse to issue what a provider would reject as malformed
    return signed


def verify_ticket(
    data: Any,
    *,
    platform_key: bytes,
    provider_peer: str | None = None,
    model_id: str | None = None,
    now: float | None = None,
) -> JobTicket:
    """Parse ``data`` and check it was signed by ``platform_key``, names ``provider_peer``
    and ``model_id`` (when given) and has not expired. Raises :class:`TicketError`."""
    ticket = JobTicket.from_dict(data)
    if not verify_signature(platform_key, ticket.signing_bytes(), bytes.fromhex(ticket.signature)):
        raise TicketError(
            f"ticket {ticket.ticket_id} is not signed by the marketplace's platform key", code=codes.TICKET_SIGNATURE
        )
    if provider_peer is not None and ticket.provider_peer != provider_peer:
        raise TicketError(
            f"ticket {ticket.ticket_id} was issued to {ticket.provider_peer}, not to this provider",
            code=codes.TICKET_WRONG_PROVIDER,
        )
    if model_id is not None and ticket.model_id != model_id:
        raise TicketError(
            f"ticket {ticket.ticket_id} is for model {ticket.model_id}, this provider serves {model_id}",
            code=codes.TICKET_WRONG_PROVIDER,
        )
    current = time.time() if now is None else now
    if ticket.expires_at + CLOCK_SKEW_S < current:
        raise TicketError(
            f"ticket {ticket.ticket_id} expired; ask the marketplace for a new plan", code=codes.TICKET_EXPIRED
        )
    return ticket
