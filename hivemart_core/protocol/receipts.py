"""Work receipts: a provider's signed, cumulative account of the work it did on a ticket.

A provider keeps one counter per (ticket, session): work units, steps, and a hash chain
over the digests of every output it returned. Each receipt restates the totals so far with
a sequence number one higher than the last, so the newest receipt supersedes all earlier
ones and a lost receipt loses nothing. The client checks a receipt against its own count
and its own copy of the outputs, then countersigns it; the marketplace settles the increase
since the last receipt it settled for that (ticket, session).

Work units (docs/protocol.md, "Tickets and receipts"): one token through one block; a backward
counts ``BACKWARD_WORK_FACTOR`` (2) times, since it computes about twice a forward's work (the
gradient with respect to the input and the recomputed forward it needs).

Signed bytes:
- provider: ``RECEIPT_DOMAIN`` + canonical JSON of the body (every field but the two signatures);
- client:   ``CLIENT_DOMAIN`` + the same JSON + the provider's signature (hex, ASCII), so the
  countersignature covers exactly the receipt the provider signed.

Hash chain: ``chain_0 = sha256(CHAIN_DOMAIN + ticket_id + "\\n" + session_id)``, then
``chain_n = sha256(chain_{n-1} || output_digest_n)`` (raw 32-byte digests), where
``output_digest`` is :func:`tensor_digest` of the output as sent on the wire.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity, public_key_from_peer_id, verify_signature
from hivemart_core.protocol.tickets import (
    HEX64_PATTERN,
    PEER_ID_PATTERN,
    TICKET_ID_PATTERN,
    JobTicket,
    canonical_json,
    field_int,
    field_str,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "RECEIPT_DOMAIN",
    "CLIENT_DOMAIN",
    "WorkReceipt",
    "ReceiptError",
    "ReceiptCounter",
    "work_units",
    "BACKWARD_WORK_FACTOR",
    "MAX_RECEIPTS_PER_UPLOAD",
    "tensor_digest",
    "chain_start",
    "chain_next",
    "verify_receipt",
    "countersign",
]

RECEIPT_DOMAIN = b"hivemart-receipt/1\n"
CLIENT_DOMAIN = b"hivemart-receipt-client/1\n"
# Work units a backward costs per token and block, relative to a forward's one. Providers
# charge by it (``work_units``), clients mirror the count, and the scheduler prices a
# fine-tuning token (a forward and a backward) at ``1 + BACKWARD_WORK_FACTOR`` per block.
BACKWARD_WORK_FACTOR = 2
# The most receipts one upload (POST /api/receipts/) may carry: the marketplace refuses more
# (400), and serves the figure in its platform info (``limits.receipts_per_upload``) so that
# uploaders split their batches by what the server they talk to accepts.
MAX_RECEIPTS_PER_UPLOAD = 500
CHAIN_DOMAIN = b"hivemart-chain/1\n"
SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


class ReceiptError(ProtocolError):
    """A receipt that must not be accepted. ``code``: ``bad_receipt`` (malformed),
    ``receipt_signature`` (provider signature), ``client_signature``, ``receipt_ticket``
    (does not match its ticket), ``receipt_units`` (more than the ticket allows or than
    the client counted), ``receipt_chain`` (outputs differ from what the client received),
    ``receipt_replay`` (not newer than one already accepted)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code)


def work_units(*, tokens: int, blocks: int, backward: bool = False) -> int:
    """Work units of ``tokens`` token positions (batch x length) through ``blocks`` blocks."""
    return tokens * blocks * (BACKWARD_WORK_FACTOR if backward else 1)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 over a tensor's wire dtype, shape and little-endian bytes (32 raw bytes)."""
    from hivemart_core.protocol.framing import _tensor_bytes, _wire_dtype

    digest = hashlib.sha256()
    digest.update(f"{_wire_dtype(tensor)}:{','.join(map(str, tensor.shape))}\n".encode())
    digest.update(_tensor_bytes(tensor))
    return digest.digest()


def chain_start(ticket_id: str, session_id: str) -> bytes:
    return hashlib.sha256(CHAIN_DOMAIN + f"{ticket_id}\n{session_id}".encode()).digest()


def chain_next(chain: bytes, output_digest: bytes) -> bytes:
    return hashlib.sha256(chain + output_digest).digest()


def _int(data: dict[str, Any], key: str, *, low: int = 0) -> int:
    return field_int(data, key, low=low, error=ReceiptError, code="bad_receipt")


def _str(data: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    return field_str(data, key, pattern, what, error=ReceiptError, code="bad_receipt")


@dataclass(frozen=True)
class WorkReceipt:
    """Cumulative work on ``ticket_id`` within ``session_id`` as of receipt number ``seq``."""

    ticket_id: str
    job_id: int
    session_id: str
    provider_peer: str
    units: int
    steps: int
    chain: str
    seq: int
    issued_at: int
    provider_signature: str = ""
    client_signature: str = ""

    def body(self) -> dict[str, Any]:
        # Every field is a str or an int: a shallow dict equals asdict() and costs far less
        # (the marketplace builds one per uploaded receipt).
        return {name: getattr(self, name) for name in _BODY_FIELDS}

    def signing_bytes(self) -> bytes:
        return RECEIPT_DOMAIN + canonical_json(self.body())

    def client_signing_bytes(self) -> bytes:
        return CLIENT_DOMAIN + canonical_json(self.body()) + self.provider_signature.encode()

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ALL_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> WorkReceipt:
        """Parse and type-check (no signature checks: see :func:`verify_receipt`)."""
        if not isinstance(data, dict):
            raise ReceiptError("a receipt must be a map", code="bad_receipt")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ReceiptError(f"unknown receipt fields: {sorted(unknown)}", code="bad_receipt")
        client_signature = data.get("client_signature", "")
        if client_signature != "" and (not isinstance(client_signature, str) or not _HEX128.match(client_signature)):
            raise ReceiptError("'client_signature' must be empty or a hex Ed25519 signature", code="bad_receipt")
        return cls(
            ticket_id=_str(data, "ticket_id", TICKET_ID_PATTERN, "a ticket id"),
            job_id=_int(data, "job_id", low=1),
            session_id=_str(data, "session_id", SESSION_ID_PATTERN, "8 to 64 characters of [A-Za-z0-9_-]"),
            provider_peer=_str(data, "provider_peer", PEER_ID_PATTERN, "a base58 peer id"),
            units=_int(data, "units"),
            steps=_int(data, "steps"),
            chain=_str(data, "chain", HEX64_PATTERN, "a hex sha256 digest"),
            seq=_int(data, "seq", low=1),
            issued_at=_int(data, "issued_at"),
            provider_signature=_str(data, "provider_signature", _HEX128, "a hex Ed25519 signature"),
            client_signature=client_signature,
        )


_ALL_FIELDS = tuple(f.name for f in fields(WorkReceipt))
_BODY_FIELDS = tuple(n for n in _ALL_FIELDS if n not in ("provider_signature", "client_signature"))


def verify_receipt(data: Any, ticket: JobTicket, *, require_client_signature: bool = False) -> WorkReceipt:
    """Check a receipt against the (already verified) ticket it claims: same ticket, job
    and provider, a valid provider signature, units within the ticket, and the client's
    countersignature when present (or required). Raises :class:`ReceiptError`."""
    receipt = WorkReceipt.from_dict(data)
    if (receipt.ticket_id, receipt.job_id, receipt.provider_peer) != (
        ticket.ticket_id,
        ticket.job_id,
        ticket.provider_peer,
    ):
        raise ReceiptError(
            f"receipt for ticket {receipt.ticket_id} (job {receipt.job_id}) does not match "
            f"ticket {ticket.ticket_id} (job {ticket.job_id})",
            code="receipt_ticket",
        )
    if not verify_signature(
        public_key_from_peer_id(receipt.provider_peer),
        receipt.signing_bytes(),
        bytes.fromhex(receipt.provider_signature),
    ):
        raise ReceiptError(
            f"receipt {receipt.ticket_id}#{receipt.seq} is not signed by {receipt.provider_peer}",
            code="receipt_signature",
        )
    if receipt.units > ticket.max_units:
        raise ReceiptError(
            f"receipt claims {receipt.units} units; ticket {ticket.ticket_id} allows {ticket.max_units}",
            code="receipt_units",
        )
    if receipt.client_signature:
        if not verify_signature(
            bytes.fromhex(ticket.client_key), receipt.client_signing_bytes(), bytes.fromhex(receipt.client_signature)
        ):
            raise ReceiptError(
                f"receipt {receipt.ticket_id}#{receipt.seq}: the client signature does not verify "
                f"against the ticket's client key",
                code="client_signature",
            )
    elif require_client_signature:
        raise ReceiptError(f"receipt {receipt.ticket_id}#{receipt.seq} is not countersigned", code="client_signature")
    return receipt


def countersign(receipt: WorkReceipt, client: Identity) -> WorkReceipt:
    """The client's countersignature: it agrees with the totals and the output chain."""
    return replace(receipt, client_signature=client.sign(receipt.client_signing_bytes()).hex())


class ReceiptCounter:
    """Running totals for one (ticket, session), kept by the provider and mirrored by the
    client: both feed it the same outputs, so their chains agree unless an output differs."""

    def __init__(self, ticket: JobTicket, session_id: str) -> None:
        self.ticket, self.session_id = ticket, session_id
        self.units = self.steps = self.seq = 0
        self._chain = chain_start(ticket.ticket_id, session_id)

    @property
    def units_left(self) -> int:
        return self.ticket.max_units - self.units

    @property
    def chain(self) -> str:
        return self._chain.hex()

    def record(self, units: int, output_digest: bytes) -> None:
        """Count one step's work and extend the chain with its output's digest."""
        self.units += units
        self.steps += 1
        self._chain = chain_next(self._chain, output_digest)

    def receipt(self, provider: Identity, *, now: float | None = None) -> WorkReceipt:
        """A new signed receipt of the totals so far (the sequence number goes up by one)."""
        self.seq += 1
        unsigned = WorkReceipt(
            ticket_id=self.ticket.ticket_id,
            job_id=self.ticket.job_id,
            session_id=self.session_id,
            provider_peer=provider.peer_id,
            units=self.units,
            steps=self.steps,
            chain=self.chain,
            seq=self.seq,
            issued_at=int(time.time() if now is None else now),
        )
        return replace(unsigned, provider_signature=provider.sign(unsigned.signing_bytes()).hex())
