"""Replanning: a client reports a failed provider, and its segments get new primaries."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction

from marketplace.accounts.models import User
from marketplace.common.errors import Conflict, InvalidTransition, PermissionDenied, ValidationFailed
from marketplace.jobs.models import Job, PlanSegment
from marketplace.jobs.models import Plan as PlanRow
from marketplace.jobs.selectors import job_plan_current
from marketplace.jobs.services import job_plan_store
from scheduler.matching import InvalidPlanError, NoPlanError, Offer, Plan, Segment, replan_segment
from scheduler.services.offers import (
    UNKNOWN_LATENCY_MS,
    UNKNOWN_THROUGHPUT,
    job_request,
    offers_for_matching,
    reason_clip,
    segment_specs,
)


def _stored_plan(row: PlanRow, job: Job, figures: dict[str, Offer]) -> Plan:
    """A stored plan in the matcher's terms; latencies come from the providers' current figures.

    A primary with no current figures (offline: the very case a replan exists for) gets the
    pessimistic ``UNKNOWN_LATENCY_MS`` and ``UNKNOWN_THROUGHPUT``; a replan weighs the kept
    segments by latency and price only, so the placeholder never decides anything."""
    segments = []
    for seg in row.segments.all():
        primary = str(seg.provider_id)
        offer = figures.get(primary)
        blocks = seg.block_end - seg.block_start
        latency = offer.segment_latency_ms(blocks) if offer else UNKNOWN_LATENCY_MS
        throughput = offer.throughput / blocks if offer else UNKNOWN_THROUGHPUT
        segments.append(
            Segment(
                start=seg.block_start,
                end=seg.block_end,
                primary=primary,
                backups=tuple(str(b.provider_id) for b in seg.backups.all()),
                price=seg.price,
                latency_ms=latency,
                throughput=throughput,
            )
        )
    return Plan(kind=job.kind, num_blocks=job.model.num_blocks, segments=tuple(segments))


@dataclass(frozen=True)
class Replan:
    """The job's plan after a replan, and the indices of its replacement segments."""

    plan: PlanRow
    replaced: tuple[int, ...]


def _voided_providers(job: Job) -> set[str]:
    """Providers whose tickets for ``job`` an audit voided (as the matcher names providers)."""
    from marketplace.receipts.models import Ticket

    return {
        str(pk) for pk in Ticket.objects.filter(job=job, voided_at__isnull=False).values_list("provider_id", flat=True)
    }


def job_replan(*, job: Job, by: User, failed_provider_id: int) -> Replan:
    """A client reports that ``failed_provider_id`` failed while serving ``job``: store a new
    plan version whose segments replace every segment it was primary of, within the job's
    price cap, and return it.

    Idempotent for the client's retries: reporting a provider that an earlier replan already
    replaced returns the current plan with no replacements. A provider once replaced is not
    chosen again for this job, nor is one an audit caught cheating on it (its backup slots
    are dropped too). Conflict ``no_plan`` (with the
    uncovered blocks in ``extra``) when nobody else can serve its blocks.
    """
    if not by.is_staff and job.user_id != by.pk:
        raise PermissionDenied("this is not your job")
    with transaction.atomic():
        job = Job.objects.select_for_update(of=("self",)).select_related("model").get(pk=job.pk)
        if job.state not in (Job.State.PLANNED, Job.State.RUNNING):
            raise InvalidTransition(f"a {job.state} job cannot be replanned", extra={"state": job.state})
        current = job_plan_current(job=job)
        if current is None:
            raise InvalidTransition("this job has no plan yet", extra={"state": job.state})
        offers = offers_for_matching(model=job.model)
        plan = _stored_plan(current, job, {o.provider_id: o for o in offers})
        failed = str(failed_provider_id)
        # Providers an earlier replan dropped from this job failed it once: never bring them back.
        in_plan = plan.primaries | {b for s in plan.segments for b in s.backups}
        dropped = {str(pk) for pk in PlanSegment.objects.filter(plan__job=job).values_list("provider_id", flat=True)}
        offers = [o for o in offers if o.provider_id in in_plan or o.provider_id not in dropped]
        # A provider an audit caught cheating on this job is never planned for it again.
        voided = _voided_providers(job)
        offers = [o for o in offers if o.provider_id not in voided]
        if failed not in plan.primaries:
            if PlanSegment.objects.filter(plan__job=job, provider_id=failed_provider_id).exists():
                return Replan(current, ())
            raise ValidationFailed(
                f"provider {failed_provider_id} serves no segment of job #{job.pk}",
                extra={"field": "provider", "provider": failed_provider_id},
            )
        try:
            replacements = replan_segment(plan, failed, offers, job_request(job))
        except NoPlanError as e:
            raise Conflict(str(e), extra=e.extra, code="no_plan") from None
        except InvalidPlanError as e:
            raise ValidationFailed(str(e), extra={"field": "provider"}) from None
        kept = [
            Segment(
                start=s.start,
                end=s.end,
                primary=s.primary,
                price=s.price,
                latency_ms=s.latency_ms,
                throughput=s.throughput,
                backups=tuple(b for b in s.backups if b != failed and b not in voided),
            )
            for s in plan.segments
            if s.primary != failed
        ]
        segments = sorted([*kept, *replacements], key=lambda s: s.start)
        row = job_plan_store(
            job=job,
            segments=segment_specs(segments),
            reason=reason_clip(f"provider {failed_provider_id} failed: replaced {len(replacements)} segment(s)"),
        )
    replaced = tuple(i for i, s in enumerate(segments) if s in replacements)
    return Replan(job_plan_current(job=job) or row, replaced)
