"""Housekeeping meets settlement: a running job failed at its deadline still pays for the
work uploaded before it, and the beat schedule runs settlement and the audit sweep."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.models import Account
from marketplace.ledger.selectors import ledger_verify
from marketplace.receipts.services import receipts_upload
from scheduler import services
from scheduler.celery import beat_schedule
from tests.marketplace.settlement import planned_job, platform_key_file


@pytest.mark.django_db
def test_a_running_job_failed_at_its_deadline_pays_its_uploaded_work_first(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_PLATFORM_FEE_BPS = 0
    pj = planned_job(budget=100_000, price=1_000)
    p = pj.providers[0]
    # the provider uploads the receipt the client acknowledged (countersigned)
    receipts_upload(user=p.user, receipts=[pj.receipt(p, 5_000_000).to_dict()])
    expired = services.holds_expire(now=timezone.now() + timedelta(seconds=settings.HIVEMART_JOB_RUN_TIMEOUT_S + 60))
    assert expired == [pj.job.pk]
    pj.job.refresh_from_db()
    assert pj.job.state == Job.State.FAILED and pj.job.hold.state == "closed"
    assert Account.objects.get(pk=p.earnings_account_id).balance == 5_000
    wallet = Account.objects.get(user=pj.client, kind=Account.Kind.WALLET)
    assert wallet.balance == 200_000 - 5_000  # funded twice the budget; the rest came back
    assert ledger_verify().consistent


def test_the_beat_schedule_settles_and_sweeps_audits() -> None:
    from django.conf import settings

    tasks = {entry["task"]: entry["schedule"] for entry in beat_schedule(settings).values()}
    assert tasks["scheduler.receipts_settle"] == timedelta(seconds=settings.HIVEMART_SETTLE_INTERVAL_S)
    assert "scheduler.audits_decide_open" in tasks
