"""Reads for jobs. (The offers a plan is made from: ``marketplace.providers.selectors.offers_for_model``.)"""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.jobs.models import Job, JobTransition, Plan, PlanSegment


def jobs_visible_to(*, user: User) -> QuerySet[Job]:
    """A user's own jobs; staff see all of them."""
    jobs = Job.objects.select_related("model", "hold__escrow")
    return jobs if user.is_staff else jobs.filter(user=user)


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
