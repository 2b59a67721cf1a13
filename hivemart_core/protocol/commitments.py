"""Step records: what a provider signs about each inference step, so pushes cannot frame.

In a pushed chain a provider sends its output twice: to the client (``return_outputs``) and
to the next provider. Nothing forced the two to be equal, so a provider could return honest
outputs to the client and push noise downstream; the next provider then computed on the
noise, and shadow verification (which recomputes from what the client received) blamed the
honest downstream hop. Step records close that hole.

For every step it computes, a provider signs one :class:`StepRecord`: its peer id, its
session (the client's id and a random ``instance`` the provider drew when the session opened,
so that a client reopening a session under an old id gets records that cannot be confused
with the old ones), the ticket that pays for it (empty in free mode), the step id and position, and the digests (``tensor_digest``, hex) of the hidden
states it computed on, as received, and of its output, as sent. It attaches the same
record to the output it returns to the client and to the output it pushes to the next
provider. The next provider checks the record before computing (the signer is the peer that
pushed, the output digest is the tensor it got) and refuses the push otherwise, then hands
the record on to its client with its own output (``input_record``). So the client holds, per
step and hop, two statements of the upstream provider about its output: the one that came
with the output it returned, and the one the downstream provider received with the push.

An honest provider never signs two different records for one (session, step): it computes a
step id once per session and refuses an old step id again (``stale_step``). Two records
signed by one peer for the same (session, step) that differ are therefore proof, checkable
by anyone with the peer id alone, that the peer sent different outputs for one step:
:func:`equivocation`. A downstream provider cannot frame an honest upstream one: it cannot
sign a record in the upstream's name, and a record it does not hold cannot be shown.

Signed bytes: ``STEP_DOMAIN`` + canonical JSON of every field but ``signature``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity, public_key_from_peer_id, verify_signature
from hivemart_core.protocol.receipts import SESSION_ID_PATTERN, tensor_digest
from hivemart_core.protocol.tickets import HEX64_PATTERN, PEER_ID_PATTERN, canonical_json, field_int, field_str

if TYPE_CHECKING:
    import torch

__all__ = ["STEP_DOMAIN", "StepRecord", "StepRecordError", "sign_step", "equivocation", "digest_hex"]

STEP_DOMAIN = b"hivemart-step/1\n"
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_INSTANCE = re.compile(r"^[0-9a-f]{16}$")
_TICKET_ID_OR_EMPTY = re.compile(r"^(?:[A-Za-z0-9_-]{8,64})?$")  # TICKET_ID_PATTERN, or "" in free mode
_MAX_STEP_ID = 2**62


class StepRecordError(ProtocolError):
    """A step record that is malformed (``bad_step_record``), not signed by the peer it names
    (``step_record_signature``), or not about the step and tensor it came with
    (``step_record_mismatch``)."""

    def __init__(self, message: str, *, code: str = "bad_step_record") -> None:
        super().__init__(message, code=code)


def digest_hex(tensor: torch.Tensor) -> str:
    """``tensor_digest`` in hex: the form step records carry."""
    return tensor_digest(tensor).hex()


@dataclass(frozen=True)
class StepRecord:
    """Provider ``peer`` computed step ``step_id`` (positions from ``position``) of its session
    ``session_id`` (opened as ``instance``), paid by ticket ``ticket_id`` ("" in free mode), on
    hidden states with digest ``input_digest`` and sent an output with digest ``output_digest``."""

    peer: str
    session_id: str
    instance: str
    ticket_id: str
    step_id: int
    position: int
    input_digest: str
    output_digest: str
    signature: str = ""

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _BODY_FIELDS}

    def signing_bytes(self) -> bytes:
        return STEP_DOMAIN + canonical_json(self.body())

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ALL_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> StepRecord:
        """Parse and type-check (see :meth:`verify` for the signature)."""
        if not isinstance(data, dict):
            raise StepRecordError("a step record must be a map")
        unknown = set(data) - set(_ALL_FIELDS)
        if unknown:
            raise StepRecordError(f"unknown step record fields: {sorted(unknown)}")

        def text(key: str, pattern: re.Pattern[str], what: str) -> str:
            return field_str(data, key, pattern, what, error=StepRecordError, code="bad_step_record")

        return cls(
            peer=text("peer", PEER_ID_PATTERN, "a base58 peer id"),
            session_id=text("session_id", SESSION_ID_PATTERN, "8 to 64 characters of [A-Za-z0-9_-]"),
            instance=text("instance", _INSTANCE, "16 hex digits"),
            ticket_id=text("ticket_id", _TICKET_ID_OR_EMPTY, "a ticket id, or empty in free mode"),
            step_id=field_int(data, "step_id", high=_MAX_STEP_ID, error=StepRecordError, code="bad_step_record"),
            position=field_int(data, "position", error=StepRecordError, code="bad_step_record"),
            input_digest=text("input_digest", HEX64_PATTERN, "a hex sha256 digest"),
            output_digest=text("output_digest", HEX64_PATTERN, "a hex sha256 digest"),
            signature=text("signature", _HEX128, "a hex Ed25519 signature"),
        )

    def verify(self) -> StepRecord:
        """Raise :class:`StepRecordError` unless ``peer`` signed this record; returns it."""
        try:
            key = public_key_from_peer_id(self.peer)
        except ProtocolError as e:
            raise StepRecordError(str(e), code="step_record_signature") from None
        if not verify_signature(key, self.signing_bytes(), bytes.fromhex(self.signature)):
            raise StepRecordError(
                f"step record of step {self.step_id} is not signed by {self.peer}", code="step_record_signature"
            )
        return self

    def check_about(
        self,
        *,
        peer: str,
        step_id: int,
        position: int | None,
        output_digest: str | None = None,
        session_id: str | None = None,
        ticket_id: str | None = None,
    ) -> StepRecord:
        """Raise ``step_record_mismatch`` unless the record is ``peer``'s about this step (and
        this output, session and ticket, when given); returns it. Does not check the signature."""
        expected = {
            "peer": peer,
            "step_id": step_id,
            "position": position,
            "output_digest": output_digest,
            "session_id": session_id,
            "ticket_id": ticket_id,
        }
        wrong = [k for k, v in expected.items() if v is not None and getattr(self, k) != v]
        if wrong:
            raise StepRecordError(
                f"the step record does not match the step it came with: {', '.join(wrong)} differ",
                code="step_record_mismatch",
            )
        return self


_ALL_FIELDS = tuple(f.name for f in fields(StepRecord))
_BODY_FIELDS = tuple(n for n in _ALL_FIELDS if n != "signature")


def sign_step(
    identity: Identity,
    *,
    session_id: str,
    instance: str,
    step_id: int,
    position: int,
    input_digest: str,
    output_digest: str,
    ticket_id: str = "",
) -> StepRecord:
    """The record ``identity`` signs for one step it computed."""
    unsigned = StepRecord(
        peer=identity.peer_id,
        session_id=session_id,
        instance=instance,
        ticket_id=ticket_id,
        step_id=step_id,
        position=position,
        input_digest=input_digest,
        output_digest=output_digest,
    )
    return replace(unsigned, signature=identity.sign(unsigned.signing_bytes()).hex())


def equivocation(first: Any, second: Any) -> bool:
    """True when two records (dicts or :class:`StepRecord`) prove that their signer sent two
    different outputs for one step: both parse and are signed by the same peer, for the same
    session and step id, and differ in position or digests. Anything else (a malformed or
    forged record, another session, session instance, ticket or step) proves nothing and
    returns False."""
    try:
        a = first if isinstance(first, StepRecord) else StepRecord.from_dict(first)
        b = second if isinstance(second, StepRecord) else StepRecord.from_dict(second)
        a.verify()
        b.verify()
    except StepRecordError:
        return False
    same_step = (a.peer, a.session_id, a.instance, a.ticket_id, a.step_id) == (
        b.peer,
        b.session_id,
        b.instance,
        b.ticket_id,
        b.step_id,
    )
    return same_step and (a.position, a.input_digest, a.output_digest) != (b.position, b.input_digest, b.output_digest)
