"""Matching pending jobs: store the matcher's plan, or fail the job with its reason.

A job that cannot be planned **fails** with the matcher's reason (``JobTransition.reason``,
e.g. "blocks 2..4 are served only at >= 1500 micro-credits per million units; raise
max_price"), which releases its hold at once. A pending job would tie up the client's
credits while nothing tells it why; the reason says what to change before creating a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from hivemart_core.figures import format_price_per_million_tokens
from marketplace.common.errors import ValidationFailed
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import jobs_in_state
from marketplace.jobs.services import job_plan_store, job_transition
from scheduler.matching import NoPlanError, match_job
from scheduler.services.offers import job_request, offers_for_matching, reason_clip, segment_specs

logger = logging.getLogger(__name__)


class MatchRaced(Exception):
    """The plan could not be stored because providers changed while it was computed; transient."""


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
            job_transition(job=job, to_state=Job.State.FAILED, reason=reason_clip(str(e)))
            return MatchOutcome(job_id, "failed", str(e))
        try:
            with transaction.atomic():
                row = job_plan_store(
                    job=job,
                    segments=segment_specs(plan.segments),
                    # No latency here: the matcher's figure stands in a pessimistic constant for
                    # unmeasured providers; the job page estimates speed from measured figures.
                    reason=reason_clip(
                        f"matched: {len(plan.segments)} segment(s), "
                        f"{format_price_per_million_tokens(plan.cost_per_million_tokens)}"
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
