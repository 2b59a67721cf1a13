"""Settlement: paying providers for their uploaded receipts from the job's hold, closing jobs.

Per ticket, across its sessions, the payable units are what the client countersigned plus at
most the credit window of work only the provider signed for (no window while the client
disputes a receipt of the ticket); ``cost(u) = ceil(u * price / 1e6)`` on cumulative units,
the fee ``floor(cost * fee_bps / 1e4)`` on the cumulative paid amount (``pricing``). One
capture (``ledger.services.hold_capture``) per (job, provider) per run, never beyond the
segment's share or what is left of the hold (the rest is recorded as a shortfall). Each (job,
provider) is settled in one transaction under the job's row lock, so concurrent settlers pay
once. Voided tickets are never paid.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.jobs.services import job_transition
from marketplace.ledger.models import Hold
from marketplace.ledger.services import (
    hold_capture,
)
from marketplace.receipts.models import UNSETTLED, Receipt, Settlement, Ticket
from marketplace.receipts.services.pricing import PAYABLE_STATES, payable_units, ticket_cost, ticket_fee

logger = logging.getLogger(__name__)


@dataclass
class SettleSummary:
    """One settlement run: receipts settled, micro-credits captured and owed beyond holds,
    (job, provider) groups paid, jobs closed."""

    receipts: int = 0
    captured: int = 0
    shortfall: int = 0
    groups: int = 0
    closed: list[int] = field(default_factory=list)

    def add(self, other: SettleSummary) -> None:
        self.receipts += other.receipts
        self.captured += other.captured
        self.shortfall += other.shortfall
        self.groups += other.groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "receipts": self.receipts,
            "captured": self.captured,
            "shortfall": self.shortfall,
            "groups": self.groups,
            "closed": self.closed,
        }


def _unsettled() -> Any:
    return Receipt.objects.filter(UNSETTLED, ticket__voided_at__isnull=True)


def _settle_key(receipts: Sequence[Receipt], tickets: dict[int, Ticket]) -> str:
    digest = hashlib.sha256()
    for r in sorted(receipts, key=lambda r: (tickets[r.ticket_id].ticket_id, r.session_id)):
        digest.update(f"{tickets[r.ticket_id].ticket_id}/{r.session_id}/{r.units}/{r.acked_units}\n".encode())
    return digest.hexdigest()[:40]


def _pool_paid(tickets: dict[int, Ticket]) -> dict[tuple[int, int], int]:
    """Micro-credits paid so far to each plan segment (pool) the ``tickets`` belong to, by all
    of its tickets: ``spend_cap`` bounds the pool's total, whichever provider did the work."""
    capped = {(t.plan_id, t.segment) for t in tickets.values() if t.spend_cap is not None}
    if not capped:
        return {}
    paid: dict[tuple[int, int], int] = defaultdict(int)
    rows = Ticket.objects.filter(plan_id__in={k[0] for k in capped}, segment__in={k[1] for k in capped}).values_list(
        "plan_id", "segment", "settled_amount"
    )
    for plan_id, segment, amount in rows:
        if (plan_id, segment) in capped:
            paid[(plan_id, segment)] += amount
    return paid


@transaction.atomic
def receipt_group_settle(*, job_id: int, provider_id: int, start_planned: bool = True) -> SettleSummary:
    """Pay ``provider_id`` for its unsettled receipts on ``job_id``: one capture, under the
    job's row lock (which every settler of this job takes first, so two settle it once).
    Receipts of a planned job move it to running unless ``start_planned`` is False."""
    summary = SettleSummary()
    job = Job.objects.select_for_update(of=("self",)).select_related("hold__escrow").filter(pk=job_id).first()
    if job is None or job.state not in PAYABLE_STATES:
        return summary
    # Tickets change only under this job's lock (settlement, voiding), so reading them with the
    # receipts is enough; the receipts themselves are locked against concurrent uploads.
    receipts = list(
        _unsettled()
        .select_for_update(of=("self",))
        .select_related("ticket__provider__earnings_account")
        .filter(ticket__job_id=job_id, ticket__provider_id=provider_id)
        .order_by("pk")
    )
    if not receipts:
        return summary
    if job.state == Job.State.PLANNED and start_planned:
        job_transition(job=job, to_state=Job.State.RUNNING, reason="work receipts arrived")
    tickets = {r.ticket_id: r.ticket for r in receipts}
    units = 0
    for r in receipts:
        units += r.units - r.settled_units
        tickets[r.ticket_id].settled_units += r.units - r.settled_units
        tickets[r.ticket_id].acked_units += r.acked_units - r.settled_acked
    Receipt.objects.filter(pk__in=[r.pk for r in receipts]).update(
        settled_units=F("units"), settled_acked=F("acked_units")
    )
    return tickets_pay(
        job, provider_id, tickets, units=units, key=_settle_key(receipts, tickets), nreceipts=len(receipts)
    )


def tickets_pay(
    job: Job, provider_id: int, tickets: dict[int, Ticket], *, units: int, key: str, nreceipts: int
) -> SettleSummary:
    """Pay what ``tickets`` (of one provider, accumulators up to date) are now owed: one
    capture with the fee on cumulative amounts; caller holds the job's lock."""
    pools = _pool_paid(tickets)
    # Only settlement (and clawbacks, which add) touch this hold, under the job lock we hold.
    left = job.hold.escrow.balance if job.hold.state == Hold.State.OPEN else 0
    owed = amount = fee = 0
    for ticket in tickets.values():
        pay, short = _ticket_due(ticket, pools, left - amount)
        if pay:
            fee += ticket_fee(ticket.settled_amount + pay) - ticket_fee(ticket.settled_amount)
            ticket.settled_amount += pay
            amount += pay
        owed += pay + short
    Ticket.objects.bulk_update(tickets.values(), ["settled_units", "acked_units", "settled_amount"])
    tx = None
    if amount > 0:
        provider = next(iter(tickets.values())).provider
        tx = hold_capture(
            hold=job.hold,
            amount=amount,
            fee=fee,
            payee=provider.earnings_account,
            idempotency_key=f"job:{job.pk}:settle:{provider_id}:{key}",
            memo=f"job #{job.pk}: {units} work units",
        )
    if owed > 0:
        Settlement.objects.create(
            job=job, provider_id=provider_id, units=units, amount=amount, shortfall=owed - amount, transaction=tx
        )
        if owed > amount:
            logger.warning(
                "job #%s owes provider %s %s micro-credits beyond its hold", job.pk, provider_id, owed - amount
            )
    return SettleSummary(receipts=nreceipts, captured=amount, shortfall=owed - amount, groups=1)


def _ticket_due(ticket: Ticket, pools: dict[tuple[int, int], int], hold_left: int) -> tuple[int, int]:
    """(pay now, owed but beyond the segment's share or the hold) for one ticket whose
    accumulated ``settled_units``/``acked_units`` were just updated; updates ``pools``."""
    credit = 0 if ticket.disputed_at is not None else ticket.credit_units
    units = payable_units(
        units=ticket.settled_units, acked_units=ticket.acked_units, credit_units=credit, max_units=ticket.max_units
    )
    due = ticket_cost(units, max_units=ticket.max_units, price=ticket.price) - ticket.settled_amount
    if due <= 0:
        return 0, 0
    pay = min(due, max(0, hold_left))
    if ticket.spend_cap is not None:
        pool = (ticket.plan_id, ticket.segment)
        pay = min(pay, max(0, ticket.spend_cap - pools[pool]))
        pools[pool] += pay
    return pay, due - pay


def job_settle_before_closing(job: Job) -> None:
    """Settle a job's uploaded receipts before it is done, failed or cancelled (the jobs app's
    closing hook): cancelling or failing a job never skips paying for work already done."""
    if job.state not in PAYABLE_STATES:
        return
    providers = set(_unsettled().filter(ticket__job_id=job.pk).values_list("ticket__provider_id", flat=True))
    for provider_id in sorted(providers):
        # The job is mid-transition (the caller holds its lock): no planned -> running here.
        receipt_group_settle(job_id=job.pk, provider_id=provider_id, start_planned=False)


def jobs_close_settled(*, now: datetime | None = None) -> list[int]:
    """Settling jobs with nothing left to settle, idle for ``HIVEMART_SETTLE_GRACE_S`` (time for
    late uploads), become done, which releases what is left of their holds."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.HIVEMART_SETTLE_GRACE_S)
    pending = _unsettled().filter(ticket__job_id=OuterRef("pk"))
    closed = []
    for pk in (
        Job.objects.filter(state=Job.State.SETTLING, updated_at__lte=cutoff)
        .exclude(Exists(pending))
        .values_list("pk", flat=True)
    ):
        with transaction.atomic():
            job = Job.objects.select_for_update(of=("self",)).filter(pk=pk, state=Job.State.SETTLING).first()
            if job is None or _unsettled().filter(ticket__job_id=pk).exists():
                continue
            job_transition(job=job, to_state=Job.State.DONE, reason="settled")
        closed.append(pk)
    return closed


def receipts_settle(
    *, job_ids: Sequence[int] | None = None, close: bool = True, now: datetime | None = None
) -> SettleSummary:
    """Settle every (job, provider) with unsettled receipts (of ``job_ids`` when given), each
    in its own transaction, then close settling jobs that are finished. Idempotent: run it
    as often as you like, from as many workers as you like."""
    groups = _unsettled().filter(ticket__job__state__in=PAYABLE_STATES)
    if job_ids is not None:
        groups = groups.filter(ticket__job_id__in=list(job_ids))
    summary = SettleSummary()
    for job_id, provider_id in sorted(set(groups.values_list("ticket__job_id", "ticket__provider_id"))):
        summary.add(receipt_group_settle(job_id=job_id, provider_id=provider_id))
    if close:
        summary.closed = jobs_close_settled(now=now)
    return summary
