"""Reads for jobs. (The offers a plan is made from: ``marketplace.providers.selectors.offers_for_model``.)"""

from __future__ import annotations

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.jobs.models import Job, JobTransition, Plan, PlanSegment


def _with_failure_reason(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """``jobs`` annotated with ``failure_reason``: why the job failed (the reason of its latest
    transition to failed, e.g. the scheduler's "blocks 0..6 are served only at >= 500000 ...;
    raise max_price"), or None for a job that did not fail."""
    reason = JobTransition.objects.filter(job=OuterRef("pk"), to_state=Job.State.FAILED).order_by("-id")
    return jobs.annotate(failure_reason=Subquery(reason.values("reason")[:1]))


def jobs_visible_to(*, user: User) -> QuerySet[Job]:
    """A user's own jobs (staff: all), each with its ``failure_reason`` (see :func:`job_failure_reason`)."""
    jobs = _with_failure_reason(Job.objects.select_related("model", "hold__escrow"))
    return jobs if user.is_staff else jobs.filter(user=user)


def job_failure_reason(job: Job) -> str:
    """Why ``job`` failed ("" unless it did): the annotation when the job came from
    :func:`jobs_visible_to`, else read from its transitions."""
    if job.state != Job.State.FAILED:
        return ""
    if hasattr(job, "failure_reason"):
        return job.failure_reason or ""
    transition = job.transitions.filter(to_state=Job.State.FAILED).order_by("-id").first()
    return transition.reason if transition else ""


def job_get(*, user: User, job_id: int) -> Job:
    try:
        return jobs_visible_to(user=user).get(pk=job_id)
    except Job.DoesNotExist:
        raise NotFound(f"no job {job_id}") from None


def jobs_in_state(*, state: str) -> QuerySet[Job]:
    """Every job in ``state``, oldest first (for the scheduler)."""
    return Job.objects.select_related("model", "hold").filter(state=state).order_by("created_at", "id")


def job_transitions(*, job: Job) -> QuerySet[JobTransition]:
    return job.transitions.all()


def job_plan_current(*, job: Job) -> Plan | None:
    """The job's newest plan with its segments and ranked backups, or None before planning."""
    segments = PlanSegment.objects.select_related("provider").prefetch_related("backups__provider")
    return job.plans.prefetch_related(Prefetch("segments", queryset=segments)).order_by("-version").first()
