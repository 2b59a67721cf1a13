"""The scheduler's orchestration: read marketplace rows, run the pure algorithms, write
through the marketplace's services. Celery tasks (``scheduler.tasks``) are thin wrappers
around these functions; tests call them directly.

Decisions worth knowing:

- A job that cannot be planned **fails** with the matcher's reason (``JobTransition.reason``,
  e.g. "blocks 2..4 are served only at >= 1500 micro-credits per million units; raise
  max_price"), which releases its hold at once. A pending job would tie up the client's
  credits while nothing tells it why; the reason says what to change before creating a new one.
- Figures: a provider's latest *measured* throughput, latency and success rate when a probe
  has measured it, otherwise its self-reported throughput and latency (reliability then
  counts as exactly the floor: usable until the first probe says otherwise). A provider
  whose measured success rate is below ``HIVEMART_RELIABILITY_FLOOR_PCT`` is *degraded* and
  never planned.
- Units: a provider's throughput is work units per second, i.e. tokens/s through one block,
  which is what :class:`scheduler.matching.Offer` takes. A job's ``min_throughput`` is work
  units per second for the whole chain, so every segment must sustain
  ``min_throughput / num_blocks`` tokens/s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from hivemart_core.placement import choose_span
from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import ApplicationError, Conflict, InvalidTransition, PermissionDenied, ValidationFailed
from marketplace.jobs.models import Job, PlanSegment
from marketplace.jobs.models import Plan as PlanRow
from marketplace.jobs.selectors import job_plan_current, jobs_in_state
from marketplace.jobs.services import SegmentSpec, job_plan_store, job_transition
from marketplace.providers.models import Provider
from marketplace.providers.selectors import ProviderOffer, offers_for_model
from marketplace.providers.services import provider_measurement_record, providers_mark_stale
from scheduler.matching import (
    InvalidPlanError,
    JobRequest,
    NoPlanError,
    Offer,
    Plan,
    Segment,
    match_job,
    replan_segment,
)

logger = logging.getLogger(__name__)

# Latency assumed for a provider that has reported none and was never probed: pessimistic,
# so measured providers win ties.
UNKNOWN_LATENCY_MS = 1000.0
# Throughput (tokens/s per block) stood in for a planned provider with no current figures
# (a matcher Segment must have a positive one).
UNKNOWN_THROUGHPUT = 1e-9
_REASON_LIMIT = 200


class MatchRaced(Exception):
    """The plan could not be stored because providers changed while it was computed; transient."""


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


def reliability_floor() -> float:
    return settings.HIVEMART_RELIABILITY_FLOOR_PCT / 100


# --- offers and requests ---------------------------------------------------------------------


def matching_offer(offer: ProviderOffer) -> Offer | None:
    """``offer`` as the matcher sees it; None when it cannot be planned with (no throughput
    figure yet, or a probe measured nothing)."""
    if offer.throughput is None or offer.throughput <= 0:
        return None
    latency = UNKNOWN_LATENCY_MS if offer.latency_ms is None else offer.latency_ms
    reliability = reliability_floor() if offer.success_rate is None else offer.success_rate
    return Offer(
        provider_id=str(offer.provider_id),
        start=offer.block_start,
        end=offer.block_end,
        price=offer.price,
        throughput=offer.throughput,
        latency_ms=latency,
        reliability=reliability,
    )


def offers_for_matching(*, model: CatalogModel) -> list[Offer]:
    """Every online, unsuspended provider's offer for ``model`` that the matcher can use."""
    return [o for o in map(matching_offer, offers_for_model(model=model)) if o is not None]


def job_request(job: Job) -> JobRequest:
    """What ``job`` asks of the swarm, in the matcher's terms."""
    num_blocks = job.model.num_blocks
    min_throughput = job.min_throughput / num_blocks if job.min_throughput else None
    return JobRequest(
        num_blocks=num_blocks,
        kind=job.kind,
        max_price=job.max_price,
        budget=job.budget,
        min_throughput=min_throughput,
        backups=settings.HIVEMART_PLAN_BACKUPS,
        reliability_floor=reliability_floor(),
    )


def _segment_specs(segments: Sequence[Segment]) -> list[SegmentSpec]:
    return [
        SegmentSpec(
            block_start=s.start,
            block_end=s.end,
            provider=int(s.primary),
            backups=[int(b) for b in s.backups],
            price=s.price,
        )
        for s in segments
    ]


# --- matching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchOutcome:
    """What :func:`job_match` did: ``planned``, ``failed`` or ``skipped`` (not pending)."""

    job_id: int
    result: str
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"job": self.job_id, "result": self.result, "reason": self.reason}


def job_match(*, job_id: int) -> MatchOutcome:
    """Plan the pending job ``job_id``: store the matcher's plan (pending -> planned), or fail
    the job with the reason no plan exists.

    Idempotent: the job is locked and re-read, and anything but a pending job is left alone,
    so a redelivered or duplicated task does nothing. Raises :class:`MatchRaced` when a
    provider changed its offer between reading and storing (worth a retry).
    """
    with transaction.atomic():
        job = Job.objects.select_for_update(of=("self",)).select_related("model").filter(pk=job_id).first()
        if job is None:
            return MatchOutcome(job_id, "skipped", "no such job")
        if job.state != Job.State.PENDING:
            return MatchOutcome(job_id, "skipped", f"job is {job.state}")
        try:
            plan = match_job(job_request(job), offers_for_matching(model=job.model))
        except NoPlanError as e:
            logger.info("job #%s cannot be planned: %s", job_id, e)
            job_transition(job=job, to_state=Job.State.FAILED, reason=_clip(str(e)))
            return MatchOutcome(job_id, "failed", str(e))
        try:
            with transaction.atomic():
                row = job_plan_store(
                    job=job,
                    segments=_segment_specs(plan.segments),
                    reason=_clip(
                        f"matched: {len(plan.segments)} segments, {plan.latency_ms:.1f} ms/token, price {plan.price}"
                    ),
                )
        except ValidationFailed as e:
            raise MatchRaced(f"job #{job_id}: the plan no longer fits the providers: {e.message}") from e
    logger.info("job #%s planned (plan v%s)", job_id, row.version)
    return MatchOutcome(job_id, "planned")


def jobs_match_pending(
    *, older_than_s: float, enqueue: Callable[[int], None], now: datetime | None = None
) -> list[int]:
    """Queue ``job_match`` for pending jobs created more than ``older_than_s`` ago (their
    first message was lost, or the broker was down). Returns their ids."""
    now = now or timezone.now()
    ids = list(
        jobs_in_state(state=Job.State.PENDING)
        .filter(created_at__lt=now - timedelta(seconds=older_than_s))
        .values_list("pk", flat=True)[:1000]
    )
    for job_id in ids:
        enqueue(job_id)
    return ids


# --- replanning ------------------------------------------------------------------------------


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
            segments=_segment_specs(segments),
            reason=_clip(f"provider {failed_provider_id} failed: replaced {len(replacements)} segment(s)"),
        )
    replaced = tuple(i for i, s in enumerate(segments) if s in replacements)
    return Replan(job_plan_current(job=job) or row, replaced)


# --- housekeeping ----------------------------------------------------------------------------


def providers_expire(*, now: datetime | None = None) -> int:
    """Mark offline every provider whose heartbeats stopped; returns how many."""
    return providers_mark_stale(now=now)


def holds_expire(*, now: datetime | None = None) -> list[int]:
    """Fail jobs idle past their deadline, which releases their holds; returns their ids.

    Deadlines: a pending or planned job with no transition for ``HIVEMART_JOB_IDLE_TIMEOUT_S``
    (nobody started it), a running job ``HIVEMART_JOB_RUN_TIMEOUT_S`` after it started.
    Each job is failed in its own transaction; a job that moved on meanwhile is skipped.
    A running job's uploaded receipts are settled before it fails (the receipts app's
    closing hook in ``job_transition``).
    """
    now = now or timezone.now()
    idle = now - timedelta(seconds=settings.HIVEMART_JOB_IDLE_TIMEOUT_S)
    run = now - timedelta(seconds=settings.HIVEMART_JOB_RUN_TIMEOUT_S)
    candidates = [
        *(
            (pk, state, "idle past its deadline")
            for pk, state in Job.objects.filter(
                state__in=[Job.State.PENDING, Job.State.PLANNED], updated_at__lt=idle
            ).values_list("pk", "state")
        ),
        *(
            (pk, state, "ran past its deadline")
            for pk, state in Job.objects.filter(state=Job.State.RUNNING, updated_at__lt=run).values_list("pk", "state")
        ),
    ]
    expired = []
    for pk, state, reason in candidates:
        with transaction.atomic():
            job = Job.objects.select_for_update().filter(pk=pk, state=state).first()
            if job is None:
                continue
            try:
                job_transition(job=job, to_state=Job.State.FAILED, reason=reason)
            except ApplicationError as e:
                logger.warning("could not expire job #%s: %s", pk, e)
                continue
        expired.append(pk)
    return expired


# --- probes ----------------------------------------------------------------------------------


def providers_to_probe() -> list[Provider]:
    """Online, unsuspended providers, with their models."""
    return list(
        Provider.objects.select_related("model")
        .filter(state=Provider.State.ONLINE, suspended_at__isnull=True)
        .order_by("pk")
    )


def provider_probe_record(
    *,
    provider: Provider,
    throughput: float,
    latency_ms: float,
    success_rate: float,
    samples: int,
    measured_at: datetime | None = None,
) -> bool:
    """Store a probe's figures; returns whether the provider is now degraded (its success
    rate is below the reliability floor, so matching leaves it out)."""
    provider_measurement_record(
        provider=provider,
        throughput=throughput,
        latency_ms=latency_ms,
        success_rate=success_rate,
        samples=samples,
        measured_at=measured_at,
    )
    degraded = success_rate < reliability_floor()
    if degraded:
        logger.warning("provider %s (%s) is degraded: success rate %.2f", provider.pk, provider.peer_id, success_rate)
    return degraded


def provider_is_degraded(provider: Provider) -> bool:
    """Whether the provider's latest measurement puts it below the reliability floor."""
    m = provider.latest_measurement
    return m is not None and m.success_rate < reliability_floor()


# --- settlement ------------------------------------------------------------------------------


def receipts_settle(*, job_ids: Sequence[int] | None = None, now: datetime | None = None) -> dict[str, object]:
    """Pay providers for their unsettled receipts and close finished settling jobs
    (``marketplace.receipts.services.settlement.receipts_settle``); a summary for the task result."""
    from marketplace.receipts.services.settlement import receipts_settle as settle

    return settle(job_ids=job_ids, now=now).to_dict()


# --- audits ----------------------------------------------------------------------------------

_validators: dict[str, object] = {}


def validator_references() -> object:
    """The platform validator's reference checkpoints (``scheduler.probing.References`` over
    ``HIVEMART_MODELS_DIR``), kept per process so that a worker loads each model once."""
    from scheduler.probing import References

    key = str(settings.HIVEMART_MODELS_DIR)
    if key not in _validators:
        _validators[key] = References(settings.HIVEMART_MODELS_DIR)
    return _validators[key]


def audit_decide(*, audit_id: int, references: object | None = None) -> dict[str, object]:
    """Recompute an open audit's span with the platform validator and record the verdict
    (``scheduler.audit``); a decided audit is left alone. Without a checkpoint for the model
    the verdict is ``inconclusive`` (the validator cannot tell)."""
    from marketplace.receipts.models import Audit
    from marketplace.receipts.services.audits import audit_verdict_record
    from scheduler.audit import Verdict, audit_span
    from scheduler.probing import ReferenceUnavailable

    audit = Audit.objects.select_related("job__model").filter(pk=audit_id).first()
    if audit is None or audit.state != Audit.State.OPEN:
        return {"audit": audit_id, "verdict": audit.verdict if audit else None, "decided": False}
    model = audit.job.model
    validator_failed = False
    try:
        computer = (references or validator_references()).get(model.model_id)  # type: ignore[attr-defined]
    except ReferenceUnavailable as e:
        # Not the reporter's fault: its deposit comes back.
        verdict, validator_failed = Verdict("inconclusive", f"no validator checkpoint: {e}"), True
    else:
        verdict = audit_span(
            computer,
            start=audit.block_start,
            end=audit.block_end,
            dtype=audit.dtype,
            hidden_size=model.hidden_size,
            inputs=bytes(audit.inputs),
            claimed=bytes(audit.claimed),
            reference=bytes(audit.reference),
        )
    audit = audit_verdict_record(
        audit_id=audit_id, verdict=verdict.verdict, detail=verdict.detail, validator_failed=validator_failed
    )
    return {"audit": audit_id, "verdict": audit.verdict, "decided": True}


def audits_open(*, older_than_s: float, now: datetime | None = None) -> list[int]:
    """Open audits filed more than ``older_than_s`` ago (their message may have been lost)."""
    from marketplace.receipts.models import Audit

    cutoff = (now or timezone.now()) - timedelta(seconds=older_than_s)
    return list(
        Audit.objects.filter(state=Audit.State.OPEN, created_at__lt=cutoff).order_by("pk").values_list("pk", flat=True)
    )


def _probe_offence(provider: Provider, result: object) -> None:
    from marketplace.receipts.models import Offence
    from marketplace.receipts.services.offences import provider_offence_record

    errors = "; ".join(result.errors)  # type: ignore[attr-defined]
    provider_offence_record(
        provider=provider,
        kind=Offence.Kind.PROBE,
        detail=f"{result.mismatches} probe answers differ from the validator's: {errors}",
    )  # type: ignore[attr-defined]


# --- placement -------------------------------------------------------------------------------


def placement_suggest(*, model: CatalogModel, num_blocks: int) -> tuple[int, int]:
    """The span ``[start, end)`` of ``model`` a joining provider with room for ``num_blocks``
    blocks should serve: the one raising the weakest block's throughput (Petals' rule,
    :func:`hivemart_core.placement.choose_span`), from the usable providers' figures."""
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ValidationFailed("num_blocks is a positive integer", extra={"field": "num_blocks"})
    spans = [
        (o.start, o.end, o.throughput) for o in offers_for_matching(model=model) if o.reliability >= reliability_floor()
    ]
    return choose_span(model.num_blocks, num_blocks, spans)


def providers_probe(*, runtime: object | None = None, references: object | None = None) -> dict[str, object]:
    """Probe every online provider through the swarm (``scheduler.probing``) and record the
    measured throughput, latency and success rate; those below the reliability floor are
    degraded. Joins the swarm through ``HIVEMART_SWARM_PEERS`` unless given a ``runtime``.

    Returns ``{"probed": [...], "degraded": [...], "skipped": [...]}`` (provider ids); a
    provider is skipped when the prober has no reference checkpoint for its model.
    """
    from marketplace.receipts.services.tickets import ticket_issue_for_probe
    from scheduler.probing import ProbeTarget, References, ReferenceUnavailable, probe_provider

    summary: dict[str, list[int]] = {"probed": [], "degraded": [], "skipped": []}
    providers = providers_to_probe()
    if not providers:
        return summary
    own_runtime = runtime is None
    if own_runtime:
        if not settings.HIVEMART_SWARM_PEERS:
            logger.warning(
                "not probing %d providers: set HIVEMART_SWARM_PEERS to the swarm's bootstrap multiaddrs", len(providers)
            )
            summary["skipped"] = [p.pk for p in providers]
            return summary
        from hivemart_core.swarm.runtime import SwarmRuntime

        runtime = SwarmRuntime(settings.HIVEMART_SWARM_PEERS)
    references = references or References(settings.HIVEMART_MODELS_DIR)
    try:
        for provider in providers:
            try:
                reference = references.get(provider.model.model_id)  # type: ignore[attr-defined]
            except ReferenceUnavailable as e:
                logger.warning("cannot check provider %s: %s", provider.pk, e)
                summary["skipped"].append(provider.pk)
                continue
            units = (1 + settings.HIVEMART_PROBE_REQUESTS * settings.HIVEMART_PROBE_TOKENS) * (
                provider.block_end - provider.block_start
            )
            ticket = ticket_issue_for_probe(provider=provider, max_units=units)
            result = probe_provider(
                runtime,
                ProbeTarget(
                    provider.peer_id,
                    provider.model.model_id,
                    provider.block_start,  # type: ignore[arg-type]
                    provider.block_end,
                    ticket=ticket,
                ),
                reference,
                tokens=settings.HIVEMART_PROBE_TOKENS,
                requests=settings.HIVEMART_PROBE_REQUESTS,
                timeout=settings.HIVEMART_PROBE_TIMEOUT_S,
            )
            summary["probed"].append(provider.pk)
            if result.mismatches:
                _probe_offence(provider, result)
            if provider_probe_record(
                provider=provider,
                throughput=result.throughput,
                latency_ms=result.latency_ms,
                success_rate=result.success_rate,
                samples=result.requests,
            ):
                summary["degraded"].append(provider.pk)
    finally:
        if own_runtime:
            runtime.shutdown()  # type: ignore[union-attr]
    return summary
