"""Finishing a job: the client's last receipts, then settling (settlement pays and closes it)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.db import transaction

from marketplace.accounts.models import User
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_transition_request
from marketplace.receipts.services.uploads import ReceiptOutcome, receipts_upload

logger = logging.getLogger(__name__)


def job_finish(*, job: Job, by: User, receipts: Sequence[Any] = ()) -> tuple[Job, list[ReceiptOutcome]]:
    """The client is done: upload its last receipts (optional) and move the job to settling
    (through running when it never started). Settlement pays what is owed and closes it."""
    outcomes = receipts_upload(user=by, receipts=receipts) if receipts else []
    with transaction.atomic():
        if job.state == Job.State.PLANNED:
            job = job_transition_request(job=job, by=by, to_state=Job.State.RUNNING, reason="finishing")
        job = job_transition_request(job=job, by=by, to_state=Job.State.SETTLING, reason="finished by the client")
    grouped: dict[str, int] = defaultdict(int)
    for o in outcomes:
        grouped[o.status] += 1
    logger.info("job #%s finished; final receipts %s", job.pk, dict(grouped))
    return job, outcomes
