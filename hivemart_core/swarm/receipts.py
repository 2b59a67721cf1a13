"""The client's side of work receipts: mirror each provider's count, check, countersign, upload.

A provider keeps a :class:`~hivemart_core.protocol.receipts.ReceiptCounter` per (ticket,
session) and signs cumulative receipts of it. The client keeps the same counter, fed with
the outputs it actually received from that provider (units = tokens x blocks of the hop,
chain over ``tensor_digest`` of each output), so a receipt is countersigned only when its
units and chain equal the client's own: a provider cannot bill work whose outputs the client
never got, nor claim outputs other than those it sent. A receipt that fails a check is not
countersigned; the problem is logged and kept for the job's summary, and a receipt that is
the provider's but claims other units or outputs is reported to the marketplace as a dispute
(``dispute``): a provider-signed receipt alone is paid at most the ticket's credit window, and
nothing of that while it is disputed.

Countersigned receipts go back to the provider as acknowledgements (:meth:`ReceiptCollector.ack`):
a provider serves at most a credit window of work beyond the client's last acknowledgement.

Countersigned receipts are uploaded in batches (only the newest per (ticket, session): each
restates all earlier ones) from a background thread, so the swarm loop never waits on HTTP.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemind.utils.logging import get_logger

from hivemart_core.errors import HivemartError, ProtocolError
from hivemart_core.figures import cost_of_units
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import (
    MAX_RECEIPTS_PER_UPLOAD,
    ReceiptCounter,
    WorkReceipt,
    countersign,
    tensor_digest,
    verify_receipt,
)
from hivemart_core.protocol.tickets import JobTicket

if TYPE_CHECKING:
    import torch

__all__ = ["ReceiptCollector", "ReceiptProblem", "UploadReceipts", "DisputeReceipt"]

logger = get_logger(__name__)

# upload(receipt dicts) -> one status map per receipt: {"status": "accepted"|"stale"|"rejected", "code": ...}
UploadReceipts = Callable[[list[dict[str, Any]]], Sequence[Mapping[str, Any]]]
# dispute(receipt dict as the provider signed it, code, message): report a refused receipt
DisputeReceipt = Callable[[dict[str, Any], str, str], Any]
# Refusals worth a dispute: the provider signed for work or outputs the client did not get.
# (Replays and receipts of another session are harmless duplicates.)
_DISPUTED = ("receipt_units", "receipt_chain")


@dataclass(frozen=True)
class ReceiptProblem:
    """A receipt the client refused to countersign, or the marketplace refused to accept."""

    ticket_id: str
    session_id: str
    provider_peer: str
    code: str
    message: str
    where: str = "client"  # "client": failed the client's check; "upload": rejected by the marketplace

    def to_dict(self) -> dict[str, str]:
        return {
            "ticket_id": self.ticket_id,
            "session_id": self.session_id,
            "provider_peer": self.provider_peer,
            "code": self.code,
            "message": self.message,
            "where": self.where,
        }


class ReceiptCollector:
    """Mirrors providers' receipt counters for one job and handles the receipts they send.

    ``identity`` is the job's client key (its public key is the tickets' ``client_key``);
    ``upload`` sends a batch to the marketplace (``None``: keep them, e.g. without a market).
    Thread-safe: outputs and receipts arrive on the swarm loop, :meth:`flush` runs anywhere.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        upload: UploadReceipts | None = None,
        batch_size: int = 64,
        dispute: DisputeReceipt | None = None,
        upload_limit: int = MAX_RECEIPTS_PER_UPLOAD,
    ) -> None:
        # upload_limit: the most receipts one upload may carry, as the marketplace serves it
        # (``PlatformInfo.receipts_per_upload``); pending receipts are sent in batches of it.
        if type(upload_limit) is not int or upload_limit < 1:
            raise ValueError(f"upload_limit must be a positive integer, not {upload_limit!r}")
        if not 1 <= batch_size <= upload_limit:
            raise ValueError(f"batch_size must be in [1, {upload_limit}]")
        self.identity, self.upload, self.batch_size = identity, upload, batch_size
        self.upload_limit = upload_limit
        self.dispute = dispute
        self.disputed = 0
        self._lock = threading.Lock()
        self._mirrors: dict[tuple[str, str], ReceiptCounter] = {}
        self._digests: dict[tuple[str, str], list[bytes]] = {}  # every output's digest, for audit evidence
        self._last_seq: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[str, str], WorkReceipt] = {}  # newest countersigned, not yet uploaded
        self.latest: dict[tuple[str, str], WorkReceipt] = {}  # newest countersigned, uploaded or not
        self.problems: list[ReceiptProblem] = []
        self.countersigned = 0
        self.upload_statuses: Counter[str] = Counter()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: list[Future[None]] = []

    # --- mirroring -----------------------------------------------------------------------------

    def mirror(self, ticket: JobTicket, session_id: str) -> ReceiptCounter:
        """The client's copy of the provider's counter for (ticket, session)."""
        with self._lock:
            return self._mirror(ticket, session_id)

    def _mirror(self, ticket: JobTicket, session_id: str) -> ReceiptCounter:
        key = (ticket.ticket_id, session_id)
        counter = self._mirrors.get(key)
        if counter is None:
            counter = self._mirrors[key] = ReceiptCounter(ticket, session_id)
        return counter

    def record(self, ticket: JobTicket, session_id: str, units: int, output: torch.Tensor) -> None:
        """Count ``units`` of work whose output the client received from the ticket's provider."""
        digest = tensor_digest(output)
        with self._lock:
            self._mirror(ticket, session_id).record(units, digest)
            self._digests.setdefault((ticket.ticket_id, session_id), []).append(digest)

    def evidence(self, ticket: JobTicket, session_id: str, output: torch.Tensor) -> dict[str, Any] | None:
        """Proof that the provider signed for ``output`` (for an audit): its newest receipt of
        the session that covers the output, the digests of the session's outputs it covers (their
        chain is the receipt's), and the output's index among them. None when no receipt covers it."""
        digest = tensor_digest(output)
        key = (ticket.ticket_id, session_id)
        with self._lock:
            receipt, digests = self.latest.get(key), list(self._digests.get(key, ()))
        if receipt is None:
            return None
        covered = digests[: receipt.steps]
        found = [i for i, d in enumerate(covered) if d == digest]
        if not found:
            return None
        return {"receipt": receipt.to_dict(), "digests": [d.hex() for d in covered], "step": found[-1]}

    # --- receipts --------------------------------------------------------------------------------

    def receive(self, data: Any, *, ticket: JobTicket, session_id: str) -> WorkReceipt | None:
        """Check a receipt the provider of ``ticket`` sent for ``session_id``: signature and
        ticket, then units and chain against the mirror. Countersigns and queues it for
        upload when it agrees; otherwise records a :class:`ReceiptProblem` and returns None."""
        try:
            receipt = verify_receipt(data, ticket)
        except ProtocolError as e:  # ReceiptError, or a peer id that embeds no key
            self._problem(ticket.ticket_id, ticket.provider_peer, session_id, getattr(e, "code", "bad_receipt"), str(e))
            return None
        key = (ticket.ticket_id, session_id)
        with self._lock:
            mirror = self._mirrors.get(key)
            reason = self._disagreement(receipt, session_id, mirror)
            if reason is None:
                signed = countersign(receipt, self.identity)
                self._last_seq[key] = receipt.seq
                self._pending[key] = self.latest[key] = signed
                self.countersigned += 1
                due = len(self._pending) >= self.batch_size
        if reason is not None:
            self._problem(ticket.ticket_id, ticket.provider_peer, session_id, *reason)
            if reason[0] in _DISPUTED:
                self._dispute_in_background(receipt, *reason)
            return None
        if due:
            self._upload_in_background()
        return signed

    def ack(self, ticket: JobTicket, session_id: str) -> dict[str, Any] | None:
        """The newest countersigned receipt of (ticket, session), to send back to its provider."""
        with self._lock:
            latest = self.latest.get((ticket.ticket_id, session_id))
        return None if latest is None else latest.to_dict()

    def missing_receipt(self, ticket: JobTicket, session_id: str) -> None:
        """A billed reply came without the receipt the protocol requires."""
        self._problem(
            ticket.ticket_id, ticket.provider_peer, session_id, "receipt_missing", "a billed reply carried no receipt"
        )

    def _disagreement(
        self, receipt: WorkReceipt, session_id: str, mirror: ReceiptCounter | None
    ) -> tuple[str, str] | None:
        """Why the client will not countersign (code, message), or None when it agrees."""
        if receipt.session_id != session_id:
            return "receipt_ticket", f"receipt for session {receipt.session_id} arrived on session {session_id}"
        if receipt.seq <= self._last_seq.get((receipt.ticket_id, session_id), 0):
            return "receipt_replay", f"receipt #{receipt.seq} is not newer than one already countersigned"
        units, chain = (mirror.units, mirror.chain) if mirror is not None else (0, None)
        if receipt.units != units:
            return "receipt_units", f"receipt claims {receipt.units} units; the client counted {units}"
        if mirror is None or receipt.chain != chain:
            return "receipt_chain", "the receipt's output chain differs from the outputs the client received"
        return None

    def _problem(
        self, ticket_id: str, provider_peer: str, session_id: str, code: str, message: str, where: str = "client"
    ) -> None:
        problem = ReceiptProblem(ticket_id, session_id, provider_peer, code, message, where)
        logger.warning(
            f"receipt from {provider_peer} on ticket {ticket_id} refused by the {where} check ({code}): {message}"
        )
        with self._lock:
            self.problems.append(problem)

    # --- uploading --------------------------------------------------------------------------------

    def _take_pending(self) -> list[WorkReceipt]:
        with self._lock:
            batch, self._pending = list(self._pending.values()), {}
        return batch

    def _upload_in_background(self) -> None:
        if self.upload is None:
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemart-receipts")
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(self._executor.submit(self._upload_pending))

    def _dispute_in_background(self, receipt: WorkReceipt, code: str, message: str) -> None:
        if self.dispute is None:
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemart-receipts")
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(self._executor.submit(self._send_dispute, receipt, code, message))

    def _send_dispute(self, receipt: WorkReceipt, code: str, message: str) -> None:
        try:
            self.dispute(receipt.to_dict(), code, message)  # type: ignore[misc]
        except HivemartError as e:
            logger.warning(f"could not report the refused receipt {receipt.ticket_id}#{receipt.seq} ({e})")
            return
        with self._lock:
            self.disputed += 1

    def _upload_pending(self) -> None:
        batch = self._take_pending()
        for begin in range(0, len(batch), self.upload_limit):
            self._upload_batch(batch[begin : begin + self.upload_limit])

    def _upload_batch(self, batch: list[WorkReceipt]) -> None:
        try:
            statuses = list(self.upload([r.to_dict() for r in batch]))  # type: ignore[misc]
        except HivemartError as e:
            logger.warning(f"could not upload {len(batch)} receipts ({e}); they will be retried")
            with self._lock:
                for receipt in batch:  # keep them unless a newer one arrived meanwhile
                    self._pending.setdefault((receipt.ticket_id, receipt.session_id), receipt)
            return
        if len(statuses) != len(batch):
            logger.warning(f"the marketplace answered {len(statuses)} statuses for {len(batch)} receipts")
        for receipt, status in zip(batch, statuses, strict=False):
            state = str(status.get("status", "unknown"))
            with self._lock:
                self.upload_statuses[state] += 1
            if state == "rejected":
                code = str(status.get("code", "rejected"))
                self._problem(
                    receipt.ticket_id,
                    receipt.provider_peer,
                    receipt.session_id,
                    code,
                    str(status.get("message", "rejected by the marketplace")),
                    where="upload",
                )

    def flush(self) -> None:
        """Upload every countersigned receipt not uploaded yet, and wait for uploads in flight."""
        with self._lock:
            inflight, self._inflight = self._inflight, []
        for future in inflight:
            future.result()
        if self.upload is not None:
            self._upload_pending()

    def close(self) -> None:
        """Flush, then stop the upload thread."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def summary(self) -> dict[str, Any]:
        """Counts for a job summary: countersigned, refused (by code), upload statuses."""
        with self._lock:
            refused = Counter(p.code for p in self.problems if p.where == "client")
            rejected = Counter(p.code for p in self.problems if p.where == "upload")
            return {
                "countersigned": self.countersigned,
                "refused": dict(refused),
                "disputed": self.disputed,
                "upload": dict(self.upload_statuses),
                "upload_rejected": dict(rejected),
                "sessions": len(self._mirrors),
                "units_received": sum(m.units for m in self._mirrors.values()),
                # What the received work costs at the tickets' prices (micro-credits, rounded up
                # per ticket and session like settlement); settlement may charge less, never more.
                "cost": sum(cost_of_units(m.units, m.ticket.price) for m in self._mirrors.values()),
            }
