"""Housekeeping sweeps: providers whose heartbeats stopped, jobs idle past their deadlines."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from marketplace.common.errors import ApplicationError
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_transition
from marketplace.providers.services import providers_mark_stale

logger = logging.getLogger(__name__)


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
