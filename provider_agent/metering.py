"""Metering on the provider: job tickets in, signed work receipts out.

A provider that trusts a marketplace (it knows the platform's public key) serves billable
RPCs only under a valid job ticket. :class:`TicketBook` is that policy, kept free of the
network so it can be tested alone:

- ``check`` verifies a ticket once (Ed25519 signature, this provider, this model, expiry) and
  caches it by id; a later request with the very same ticket costs a dict comparison.
- Work units are counted per ticket across all its sessions. ``charge`` reserves a request's
  units before compute and refuses one that would exceed ``max_units`` (``ticket_exhausted``),
  so concurrent requests on one ticket cannot overshoot it together.
- A :class:`~hivemart_core.protocol.receipts.ReceiptCounter` per (ticket, session) extends the
  hash chain with the digest of every output as sent; receipts are signed with the agent's
  identity and the latest one per (ticket, session) is kept until it has been uploaded.
- Payment channel (docs/protocol.md): the client sends back its countersignature of each
  receipt (an *ack*); :meth:`TicketBook.acknowledge` checks it and keeps the countersigned
  receipt for upload (it is what the marketplace pays in full). Work the client has not
  acknowledged may reach the ticket's ``credit_units`` and no further: ``charge`` refuses
  more with ``ack_overdue`` (a request larger than the window is served only when nothing is
  outstanding), because beyond the window the marketplace would not pay for it.

Everything runs on the agent's event loop thread (no locks), except that the uploader may
read pending receipts from another thread through :meth:`TicketBook.take_pending` and
:meth:`TicketBook.requeue`, which hold a lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, WorkReceipt, tensor_digest, verify_receipt, work_units
from hivemart_core.protocol.tickets import CLOCK_SKEW_S, JobTicket, TicketError, verify_ticket

if TYPE_CHECKING:
    import torch

__all__ = ["TicketBook", "Charge", "outputs_digest", "DEFAULT_RECEIPT_EVERY"]

DEFAULT_RECEIPT_EVERY = 8
# Tickets (and their counts) kept at once. Only the marketplace can mint tickets, so this
# bounds memory against a bug, not an attacker; expired tickets are dropped first.
_MAX_TICKETS = 100_000
# (ticket, session) counters kept at once; those of expired tickets go first, once uploaded.
_MAX_COUNTERS = 200_000


def outputs_digest(outputs: Sequence[torch.Tensor]) -> bytes:
    """The digest one reply adds to the receipt chain: ``tensor_digest`` of its first tensor,
    the one every reply has (hidden states, or the input gradient of a backward). Prompt and
    adapter gradients that a fine-tuning backward adds after it are not chained: clients
    mirror the chain from the main output alone."""
    if not outputs:
        raise ValueError("a billed reply has at least one output tensor")
    return tensor_digest(outputs[0])


@dataclass
class _TicketState:
    ticket: JobTicket
    raw: dict[str, Any]  # the map as received, to recognise the same ticket without re-verifying
    used: int = 0  # units counted or reserved by requests in flight
    done: int = 0  # units of finished requests (the client has their outputs)
    acked: dict[str, int] = field(default_factory=dict)  # units the client countersigned, per session
    acked_total: int = 0  # their sum

    @property
    def unacknowledged(self) -> int:
        """Finished work the client has not countersigned yet (what the credit window bounds)."""
        return max(0, self.done - self.acked_total)


@dataclass
class _Latest:
    receipt: WorkReceipt
    uploaded: bool = False


@dataclass
class Charge:
    """Units reserved on a ticket for one request; ``commit`` after compute, ``cancel`` if it failed."""

    book: TicketBook
    ticket: JobTicket
    session_id: str
    units: int
    done: bool = field(default=False)

    def commit(self, outputs: Sequence[torch.Tensor]) -> ReceiptCounter:
        """Count the work and extend the chain with the outputs as they will be sent."""
        return self.commit_digest(outputs_digest(outputs))

    def commit_digest(self, digest: bytes) -> ReceiptCounter:
        """:meth:`commit` with :func:`outputs_digest` already computed (off the event loop, for large outputs)."""
        self.done = True
        return self.book.record(self.ticket, self.session_id, self.units, digest)

    def cancel(self) -> None:
        """Give the reserved units back (the request produced no output)."""
        if not self.done:
            self.done = True
            self.book.release(self.ticket, self.units)


class TicketBook:
    """Tickets, unit counts and receipts of one provider (see the module docstring).

    ``platform_key`` may be None until the market link has fetched it: until then every
    billable request is refused with ``not_accepting`` (clients try another provider), never
    served for free.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        model_id: str,
        platform_key: bytes | None,
        receipt_every: int = DEFAULT_RECEIPT_EVERY,
        clock: Callable[[], float] = time.time,
        max_tickets: int = _MAX_TICKETS,
        max_counters: int = _MAX_COUNTERS,
    ) -> None:
        if receipt_every < 1:
            raise ValueError("receipt_every must be >= 1")
        self.identity, self.model_id, self.platform_key = identity, model_id, platform_key
        self.receipt_every, self.clock = receipt_every, clock
        self.max_tickets, self.max_counters = max_tickets, max_counters
        self._tickets: dict[str, _TicketState] = {}
        self._counters: dict[tuple[str, str], ReceiptCounter] = {}
        self._latest: dict[tuple[str, str], _Latest] = {}
        self._lock = threading.Lock()  # guards _latest against the uploader thread

    # --- tickets ------------------------------------------------------------------------------

    def check(self, data: Any, start: int, end: int) -> JobTicket:
        """The verified ticket ``data`` if it allows work on blocks [start, end) now; else
        :class:`TicketError` with the reason's code."""
        if self.platform_key is None:
            raise TicketError(
                "this provider has not yet learnt the marketplace's platform key, so it cannot "
                "check tickets; try another provider or retry shortly",
                code=codes.NOT_ACCEPTING,
            )
        if data is None:
            raise TicketError(
                "this provider sells its work through a marketplace: billable requests need the "
                "job ticket the marketplace issued for this provider",
                code=codes.TICKET_REQUIRED,
            )
        ticket_id = data.get("ticket_id") if isinstance(data, dict) else None
        state = self._tickets.get(ticket_id) if isinstance(ticket_id, str) else None
        now = self.clock()
        if state is None or state.raw != data:
            ticket = verify_ticket(
                data,
                platform_key=self.platform_key,
                provider_peer=self.identity.peer_id,
                model_id=self.model_id,
                now=now,
            )
            if state is not None:
                raise TicketError(
                    f"ticket {ticket.ticket_id} differs from the ticket of that id this provider already holds",
                    code=codes.BAD_TICKET,
                )
            state = self._add_ticket(ticket, data, now)
        elif state.ticket.expires_at + CLOCK_SKEW_S < now:
            raise TicketError(
                f"ticket {ticket_id} expired; ask the marketplace for a new plan", code=codes.TICKET_EXPIRED
            )
        state.ticket.check_covers(start, end)
        if state.used >= state.ticket.max_units:
            raise self._exhausted(state, 1)
        return state.ticket

    def _add_ticket(self, ticket: JobTicket, data: dict[str, Any], now: float) -> _TicketState:
        if len(self._tickets) >= self.max_tickets:
            self.prune(now)
            if len(self._tickets) >= self.max_tickets:
                raise TicketError(
                    "this provider holds too many live tickets; try another provider", code=codes.NOT_ACCEPTING
                )
        state = _TicketState(ticket, dict(data))
        self._tickets[ticket.ticket_id] = state
        return state

    @staticmethod
    def _exhausted(state: _TicketState, units: int) -> TicketError:
        left = state.ticket.max_units - state.used
        return TicketError(
            f"ticket {state.ticket.ticket_id} has {left} of its {state.ticket.max_units} work units "
            f"left; this request needs {units}. The job's budget for these blocks is spent: the client "
            f"needs a job with a larger --budget",
            code=codes.TICKET_EXHAUSTED,
        )

    def units_used(self, ticket_id: str) -> int:
        """Units counted (or reserved in flight) on a ticket, over all its sessions."""
        state = self._tickets.get(ticket_id)
        return 0 if state is None else state.used

    # --- counting -----------------------------------------------------------------------------

    def charge(self, ticket: JobTicket, session_id: str, *, tokens: int, blocks: int, backward: bool = False) -> Charge:
        """Reserve the units of a request on ``ticket`` before computing it; raises
        ``ticket_exhausted`` when they do not fit in what is left."""
        units = work_units(tokens=tokens, blocks=blocks, backward=backward)
        state = self._tickets[ticket.ticket_id]
        if state.used + units > ticket.max_units:
            raise self._exhausted(state, units)
        lag = state.unacknowledged
        if lag > 0 and lag + units > ticket.credit_units:
            raise TicketError(
                f"the client has not countersigned {lag} work units on ticket {ticket.ticket_id}; its "
                f"credit window is {ticket.credit_units} units: send the countersigned receipts "
                f"(acks) before more work",
                code=codes.ACK_OVERDUE,
            )
        state.used += units
        return Charge(self, ticket, session_id, units)

    def acknowledge(self, ticket: JobTicket, data: Any) -> WorkReceipt:
        """The client's countersignature of one of this provider's receipts on ``ticket``:
        checked (both signatures, this ticket), counted as acknowledged work of its session,
        and kept for upload when it is the latest receipt of that session. Raises
        :class:`TicketError` (``bad_ack``) for anything else."""
        try:
            receipt = verify_receipt(data, ticket, require_client_signature=True)
        except ProtocolError as e:
            raise TicketError(
                f"the acknowledgement is not a countersigned receipt of ticket {ticket.ticket_id}: {e}",
                code=codes.BAD_ACK,
            ) from None
        state = self._tickets[ticket.ticket_id]
        previous = state.acked.get(receipt.session_id, 0)
        if receipt.units > previous:
            state.acked[receipt.session_id] = receipt.units
            state.acked_total += receipt.units - previous
        key = (ticket.ticket_id, receipt.session_id)
        with self._lock:
            latest = self._latest.get(key)
            if latest is not None and latest.receipt.seq == receipt.seq and not latest.receipt.client_signature:
                self._latest[key] = _Latest(receipt)  # upload the countersigned copy: it pays in full
        return receipt

    def unacknowledged(self, ticket_id: str) -> int:
        """Finished work on a ticket that the client has not countersigned yet."""
        state = self._tickets.get(ticket_id)
        return 0 if state is None else state.unacknowledged

    def release(self, ticket: JobTicket, units: int) -> None:
        state = self._tickets.get(ticket.ticket_id)
        if state is not None:
            state.used = max(0, state.used - units)

    def counter(self, ticket: JobTicket, session_id: str) -> ReceiptCounter:
        key = (ticket.ticket_id, session_id)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self.max_counters:
                self.prune(self.clock())
            counter = self._counters[key] = ReceiptCounter(ticket, session_id)
        return counter

    def record(self, ticket: JobTicket, session_id: str, units: int, output_digest: bytes) -> ReceiptCounter:
        """Count ``units`` of finished work (already reserved with :meth:`charge`) and chain its output."""
        counter = self.counter(ticket, session_id)
        counter.record(units, output_digest)
        state = self._tickets.get(ticket.ticket_id)
        if state is not None:
            state.done += units
        return counter

    # --- receipts -----------------------------------------------------------------------------

    def receipt(self, ticket: JobTicket, session_id: str) -> WorkReceipt:
        """Sign a receipt of the totals so far and keep it as the latest for upload."""
        counter = self.counter(ticket, session_id)
        receipt = counter.receipt(self.identity, now=self.clock())
        with self._lock:
            self._latest[(ticket.ticket_id, session_id)] = _Latest(receipt)
        return receipt

    def receipt_due(self, ticket: JobTicket, session_id: str) -> bool:
        """Whether an inference stream should get a receipt now: every ``receipt_every`` steps,
        and as soon as half the credit window is unacknowledged (so that the client's ack
        arrives before the window is used up)."""
        counter = self._counters.get((ticket.ticket_id, session_id))
        if counter is None or counter.steps == 0:
            return False
        if counter.steps % self.receipt_every == 0:
            return True
        latest = self._latest.get((ticket.ticket_id, session_id))
        unreceipted = counter.units - (latest.receipt.units if latest is not None else 0)
        return unreceipted > 0 and 2 * self.unacknowledged(ticket.ticket_id) >= ticket.credit_units

    def final_receipt(self, ticket: JobTicket, session_id: str) -> WorkReceipt | None:
        """A receipt for a closing session, unless the last one sent already covers every step."""
        counter = self._counters.get((ticket.ticket_id, session_id))
        if counter is None or counter.steps == 0:
            return None
        latest = self._latest.get((ticket.ticket_id, session_id))
        if latest is not None and latest.receipt.steps == counter.steps:
            return None
        return self.receipt(ticket, session_id)

    def take_pending(self, limit: int = 500) -> list[WorkReceipt]:
        """Up to ``limit`` latest receipts not yet uploaded, marked as uploaded (see :meth:`requeue`)."""
        with self._lock:
            pending = []
            for latest in self._latest.values():
                if not latest.uploaded:
                    latest.uploaded = True
                    pending.append(latest.receipt)
                    if len(pending) >= limit:
                        break
            return pending

    def requeue(self, receipts: Sequence[WorkReceipt]) -> None:
        """Upload failed: make these pending again, unless a newer receipt superseded them."""
        with self._lock:
            for receipt in receipts:
                latest = self._latest.get((receipt.ticket_id, receipt.session_id))
                if latest is not None and latest.receipt.seq == receipt.seq:
                    latest.uploaded = False

    def pending_count(self) -> int:
        with self._lock:
            return sum(not latest.uploaded for latest in self._latest.values())

    def latest(self, ticket_id: str, session_id: str) -> WorkReceipt | None:
        with self._lock:
            latest = self._latest.get((ticket_id, session_id))
        return None if latest is None else latest.receipt

    # --- housekeeping -------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Forget expired tickets whose receipts have all been uploaded; returns how many.

        An expired ticket cannot be used again, so its count is no longer needed to refuse work.
        """
        now = self.clock() if now is None else now
        expired = {tid for tid, s in self._tickets.items() if s.ticket.expires_at + CLOCK_SKEW_S < now}
        with self._lock:
            waiting = {key[0] for key, latest in self._latest.items() if not latest.uploaded}
            gone = expired - waiting
            for key in [k for k in self._latest if k[0] in gone]:
                del self._latest[key]
        for key in [k for k in self._counters if k[0] in gone]:
            del self._counters[key]
        for ticket_id in gone:
            del self._tickets[ticket_id]
        return len(gone)
