"""End to end: a real Celery worker process on a real Redis broker plans a job created
through the API. The worker is a subprocess this test starts and stops (it also dies with
the test process), consuming a queue of its own so nothing else's messages reach it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from hivemart_core.swarm.p2p import die_with_parent
from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Job
from scheduler.celery import app, beat_schedule
from tests.marketplace.test_ledger_processes import child_database_url
from tests.scheduler.factories import funded_user, make_model, measured_provider

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue only this test's producer and worker use."""
    name = f"hivemart-test-{uuid.uuid4().hex[:12]}"
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = name
    yield name
    app.conf.task_default_queue = previous


@pytest.fixture
def worker(queue: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    env = {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "DJANGO_SETTINGS_MODULE": "marketplace.settings_test",
        "HIVEMART_CELERY_QUEUE": queue,
        "HIVEMART_HOME": str(tmp_path),
    }
    log = open(tmp_path / "worker.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "scheduler",
            "worker",
            "--pool",
            "solo",
            "--queues",
            queue,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # a warm shutdown: finish the current task, then exit
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def worker_log(tmp_path: Path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")[-4000:]


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_job_created_through_the_api_is_planned_by_a_real_worker(
    worker: subprocess.Popen, settings, tmp_path: Path
) -> None:  # noqa: ANN001
    settings.HIVEMART_MATCH_ON_CREATE = True
    model = make_model(num_blocks=4)
    front = measured_provider(model=model, start=0, end=2, price=100)
    back = measured_provider(model=model, start=2, end=4, price=100)
    user = funded_user()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")

    response = client.post(
        "/api/jobs/",
        {"kind": "inference", "model": model.model_id, "budget": 1_000_000, "max_price": 1_000},
        format="json",
        HTTP_IDEMPOTENCY_KEY="e2e-1",
    )
    assert response.status_code == 201, response.json()
    job_id = response.json()["id"]

    deadline = time.monotonic() + 90  # generous: a cold worker imports Django, torch-free but slow on 2 cores
    while Job.objects.get(pk=job_id).state == Job.State.PENDING and time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker exited:\n{worker_log(tmp_path)}"
        time.sleep(0.2)

    assert Job.objects.get(pk=job_id).state == Job.State.PLANNED, worker_log(tmp_path)
    plan = client.get(f"/api/jobs/{job_id}/plan/").json()
    assert [(s["block_start"], s["block_end"], s["provider"]) for s in plan["segments"]] == [
        (0, 2, front.pk),
        (2, 4, back.pk),
    ]


def test_the_beat_schedule_names_registered_tasks() -> None:
    from django.conf import settings

    import scheduler.tasks  # noqa: F401  (registers the tasks)

    schedule = beat_schedule(settings)
    assert {entry["task"] for entry in schedule.values()} <= set(app.tasks)
    assert {"scheduler.providers_probe", "scheduler.providers_expire", "scheduler.holds_expire"} <= {
        entry["task"] for entry in schedule.values()
    }
