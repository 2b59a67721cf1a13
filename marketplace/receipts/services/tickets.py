"""Tickets: the platform-signed permissions to serve a job's blocks, and what they may be paid.

Storing a plan issues one ticket per (segment, provider), primaries and backups, signed with
the platform key. What is left of the job's hold is split over the plan's segments (price x
blocks); each segment's share (``spend_cap``) bounds what all its tickets, primary and
backups, are paid together, so a job's tickets never promise more than its hold. A ticket
states its credit window (``credit_units``). Probes get unpaid, unstored tickets
(docs/protocol.md, "Tickets and receipts: formats, signing, settlement, audits").
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from hivemart_core.protocol.tickets import issue_ticket
from marketplace.accounts.models import User
from marketplace.common.errors import Conflict, InvalidTransition, PermissionDenied, ValidationFailed
from marketplace.jobs.models import Job, Plan
from marketplace.ledger.models import Account
from marketplace.providers.models import Provider
from marketplace.receipts.models import Receipt, Ticket
from marketplace.receipts.platform import platform_identity
from marketplace.receipts.services.pricing import PAYABLE_STATES, payable_units, ticket_cost

# Bound into tickets of jobs created without a client key. The marketplace refuses client
# signatures on such tickets (a small-order key like this one must never vouch for anything).
NO_CLIENT_KEY = "00" * 32
_MAX_UNITS = 2**62


def _units_for(amount: int, price: int) -> int:
    """The most work units ``amount`` micro-credits buy at ``price`` (``ticket_cost`` rounds up)."""
    if price <= 0:
        return _MAX_UNITS
    return min(amount * 1_000_000 // price, _MAX_UNITS)


def _segment_shares(budget: int, weights: list[int]) -> list[int]:
    """Split ``budget`` over segments in proportion to ``weights`` (price x blocks: what a token
    through the whole chain costs in each), rounding down, so the shares never exceed it."""
    total = sum(weights)
    if total <= 0:
        return [budget // max(len(weights), 1)] * len(weights)
    return [budget * w // total for w in weights]


def _plan_budget(job: Job, plan: Plan) -> int:
    """What the job's hold can still promise to ``plan``'s tickets: what is left of the hold,
    less what the tickets of earlier plans may still be paid. Those are capped first at what
    they have been paid plus what their uploaded receipts and credit windows can still claim,
    so a new plan (a replan, a failover) is funded from the rest."""
    left = Account.objects.filter(pk=job.hold.escrow_id).values_list("balance", flat=True).get()
    earlier = list(
        Ticket.objects.filter(job=job, voided_at__isnull=True).exclude(plan=plan).select_for_update(of=("self",))
    )
    if not earlier:
        return left
    sums = {
        row["ticket_id"]: row
        for row in Receipt.objects.filter(ticket__in=earlier)
        .values("ticket_id")
        .annotate(units=Sum("units"), acked=Sum("acked_units"))
    }
    pools: dict[tuple[int, int], list[Ticket]] = defaultdict(list)
    for t in earlier:
        pools[(t.plan_id, t.segment)].append(t)
    outstanding = 0
    for tickets in pools.values():
        claim = paid = 0
        for t in tickets:
            row = sums.get(t.pk, {"units": 0, "acked": 0})
            units = payable_units(
                units=row["units"] or 0,
                acked_units=row["acked"] or 0,
                credit_units=t.credit_units,
                max_units=t.max_units,
            )
            claim += max(
                ticket_cost(units, max_units=t.max_units, price=t.price),
                t.settled_amount + ticket_cost(t.credit_units, max_units=t.max_units, price=t.price),
            )
            paid += t.settled_amount
        cap = tickets[0].spend_cap
        frozen = max(paid, claim if cap is None else min(cap, claim))
        if cap is None or frozen < cap:
            Ticket.objects.filter(pk__in=[t.pk for t in tickets]).update(spend_cap=frozen)
        outstanding += frozen - paid
    return max(0, left - outstanding)


# Probe tickets name this job id, which no real job reaches (ids are sequential from 1). A
# provider could tell probes from jobs by it; what it cannot do is serve them without
# computing, since their answers are checked against the platform's own recomputation.
PROBE_JOB_ID = 2**53
PROBE_TICKET_TTL_S = 600


def ticket_issue_for_probe(*, provider: Provider, max_units: int) -> dict[str, Any]:
    """A signed, unpaid (price 0), unstored ticket for the scheduler's probe of ``provider``:
    providers that sell through the marketplace refuse unticketed forwards. Receipts for it
    are refused at upload, since no job owns it."""
    if max_units < 1:
        raise ValidationFailed("a probe ticket needs at least one work unit")
    expires_at = int((timezone.now() + timedelta(seconds=PROBE_TICKET_TTL_S)).timestamp())
    signed = issue_ticket(
        platform_identity(),
        ticket_id=f"probe_{secrets.token_urlsafe(12)}",
        job_id=PROBE_JOB_ID,
        client_key=secrets.token_bytes(32).hex(),
        provider_peer=provider.peer_id,
        model_id=provider.model.model_id,
        model_digest=provider.model.weights_digest,
        start=provider.block_start,
        end=provider.block_end,
        max_units=max_units,
        price=0,
        expires_at=expires_at,
        credit_units=max_units,
    )
    return signed.to_dict()


def tickets_issue_for_plan(plan: Plan) -> list[Ticket]:
    """Issue and store a signed ticket for every primary and backup of ``plan``.

    Runs inside ``job_plan_store``'s transaction (registered as its plan hook), so a plan
    never exists without its tickets. Also used to renew a plan's tickets before they expire.
    """
    job = Job.objects.select_related("model", "hold").get(pk=plan.job_id)
    identity = platform_identity()
    # A provider caught cheating on this job gets no new tickets for it.
    voided = set(Ticket.objects.filter(job=job, voided_at__isnull=False).values_list("provider_id", flat=True))
    expires_at = int((timezone.now() + timedelta(seconds=settings.HIVEMART_TICKET_TTL)).timestamp())
    segments = list(plan.segments.select_related("provider").prefetch_related("backups__provider").order_by("index"))
    # Renewing keeps the plan's segment shares (its pools); a new plan splits what is left.
    caps = dict(Ticket.objects.filter(plan=plan).values_list("segment", "spend_cap").distinct())
    if len(caps) < len(segments):
        shares = _segment_shares(
            _plan_budget(job, plan), [seg.price * (seg.block_end - seg.block_start) for seg in segments]
        )
        caps = {seg.index: share for seg, share in zip(segments, shares, strict=False)}
    rows = []
    for seg in segments:
        slots = [(Ticket.Role.PRIMARY, 0, seg.provider, seg.price)]
        slots += [(Ticket.Role.BACKUP, b.rank, b.provider, b.price) for b in seg.backups.all()]
        cap = caps[seg.index]
        for role, rank, provider, price in slots:
            if provider.pk in voided:
                continue
            # Primary and backups of a segment are alternatives for the same work: each may be
            # paid up to the segment's share, all of them together too (spend_cap).
            max_units = max(1, _units_for(cap if cap is not None else job.budget, price))
            credit = min(max_units, settings.HIVEMART_CREDIT_WINDOW_TOKENS * (seg.block_end - seg.block_start))
            signed = issue_ticket(
                identity,
                ticket_id=secrets.token_urlsafe(18),
                job_id=job.pk,
                client_key=job.client_key or NO_CLIENT_KEY,
                provider_peer=provider.peer_id,
                model_id=job.model.model_id,
                model_digest=job.model.weights_digest,
                start=seg.block_start,
                end=seg.block_end,
                max_units=max_units,
                price=price,
                expires_at=expires_at,
                credit_units=credit,
            )
            rows.append(
                Ticket(
                    ticket_id=signed.ticket_id,
                    job=job,
                    plan=plan,
                    segment=seg.index,
                    role=role,
                    rank=rank,
                    provider=provider,
                    block_start=seg.block_start,
                    block_end=seg.block_end,
                    price=price,
                    max_units=signed.max_units,
                    credit_units=credit,
                    spend_cap=cap,
                    expires_at=datetime.fromtimestamp(expires_at, tz=UTC),
                    signed=signed.to_dict(),
                )
            )
    return Ticket.objects.bulk_create(rows)


@transaction.atomic
def tickets_renew(*, job: Job, by: User) -> list[Ticket]:
    """Fresh tickets (new ids, new expiry) for the job's current plan; the old ones stay
    payable for the work they covered. Owner or staff; the job must still be able to run."""
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    if not by.is_staff and job.user_id != by.pk:
        raise PermissionDenied("this is not your job")
    if job.state not in PAYABLE_STATES:
        raise InvalidTransition(f"a {job.state} job gets no new tickets", extra={"state": job.state})
    plan = job.plans.order_by("-version").first()
    if plan is None:
        raise Conflict("this job has no plan yet", code="no_plan")
    return tickets_issue_for_plan(plan)
