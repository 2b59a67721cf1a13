"""End to end: receipts uploaded through the API are settled by a real Celery worker on a
real Redis broker (queued on commit by the upload), and a finished job is closed by it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from rest_framework.test import APIClient

from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Job
from marketplace.ledger.models import Account
from marketplace.ledger.selectors import ledger_verify
from tests.marketplace.settlement import planned_job, platform_key_file
from tests.scheduler.test_worker import queue, worker, worker_log  # noqa: F401  (fixtures)


@pytest.fixture
def settle_env(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> Iterator[Path]:
    key = platform_key_file(tmp_path)
    settings.HIVEMART_PLATFORM_KEY_FILE = key
    settings.HIVEMART_SETTLE_ON_UPLOAD = True
    # the worker inherits these: the same platform key, and no grace period before closing
    monkeypatch.setenv("HIVEMART_PLATFORM_KEY_FILE", str(key))
    monkeypatch.setenv("HIVEMART_SETTLE_GRACE_S", "0")
    yield key


@pytest.fixture
def settle_worker(settle_env: Path, worker: subprocess.Popen) -> subprocess.Popen:  # noqa: F811
    return worker


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the worker exited:\n{worker_log(log)}"
        assert time.monotonic() < deadline, worker_log(log)
        time.sleep(0.2)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_uploaded_receipts_are_settled_and_the_finished_job_closed_by_a_real_worker(
        settle_worker: subprocess.Popen, tmp_path: Path) -> None:
    pj = planned_job(budget=1_000_000, price=1_000)
    p = pj.providers[0]
    provider_api = APIClient()
    provider_api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=p.user).raw}")
    counter = pj.counter(p)
    response = provider_api.post("/api/receipts/", {"receipts": [pj.receipt(p, 2_000_000, counter=counter,
                                                                            countersigned=False).to_dict()]},
                                 format="json")
    assert response.json()["results"][0]["status"] == "accepted"

    def earned() -> int:
        return Account.objects.get(pk=p.earnings_account_id).balance

    wait_for(lambda: earned() > 0, settle_worker, tmp_path)
    assert earned() == 2_000 - 2_000 * 500 // 10_000

    client_api = APIClient()
    client_api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=pj.client).raw}")
    last = pj.receipt(p, 1_000_000, counter=counter)
    finished = client_api.post(f"/api/jobs/{pj.job.pk}/finish/", {"receipts": [last.to_dict()]}, format="json")
    assert finished.status_code == 200 and finished.json()["job"]["state"] == "settling"
    wait_for(lambda: Job.objects.get(pk=pj.job.pk).state == Job.State.DONE, settle_worker, tmp_path)
    assert earned() == 3_000 - 3_000 * 500 // 10_000
    assert Job.objects.get(pk=pj.job.pk).hold.state == "closed"
    assert ledger_verify().consistent
