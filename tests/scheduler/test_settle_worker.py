"""End to end: receipts uploaded through the API are settled by a real Celery worker on a
real Redis broker (queued on commit by the upload), and a finished job is closed by it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    settle_worker: subprocess.Popen, tmp_path: Path
) -> None:
    pj = planned_job(budget=1_000_000, price=1_000)
    p = pj.providers[0]
    provider_api = APIClient()
    provider_api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=p.user).raw}")
    counter = pj.counter(p)
    # the provider uploads the receipt the client acknowledged (countersigned)
    response = provider_api.post(
        "/api/receipts/", {"receipts": [pj.receipt(p, 2_000_000, counter=counter).to_dict()]}, format="json"
    )
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


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_audit_filed_through_the_api_is_decided_by_a_real_worker(
    settle_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    import base64

    import torch

    from hivemart_core.models import compute_digests, create_model, load_model_info
    from hivemart_core.models.backend import SpanBackend
    from hivemart_core.protocol.framing import encode_message
    from marketplace.catalog.services import catalog_model_create
    from marketplace.receipts.models import Audit

    checkpoint = create_model(tmp_path_factory.mktemp("models") / "tiny", hidden=64, layers=2, heads=4, seed=3)
    monkeypatch.setenv("HIVEMART_MODELS_DIR", str(checkpoint.parent))
    worker_process = request.getfixturevalue("worker")  # started now, with the models folder in its environment
    info = load_model_info(checkpoint)
    digests = compute_digests(checkpoint)
    model = catalog_model_create(
        model_id=info.model_id,
        arch=info.arch,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        dtype="float32",
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
    )
    pj = planned_job(model=model)
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    honest = SpanBackend(checkpoint, 0, 2, dtype=torch.float32).forward(x, 0, 2)[:, -1:, :]

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(b"".join(bytes(f) for f in encode_message({}, [t]))).decode()

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=pj.client).raw}")
    response = client.post(
        "/api/audits/",
        {
            "job": pj.job.pk,
            "ticket_id": pj.ticket(pj.providers[0]).ticket_id,
            "session_id": "session-0001",
            "start": 0,
            "end": 2,
            "dtype": "float32",
            "inputs": b64(x),
            "claimed": b64(honest * 1.05),
            "reference": b64(honest),
            "reference_peer": pj.backups[0].peer_id,
            "deposit": 100_000,
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    audit_id = response.json()["id"]
    wait_for(lambda: Audit.objects.get(pk=audit_id).state == "decided", worker_process, tmp_path, seconds=180)
    assert Audit.objects.get(pk=audit_id).verdict == "provider_cheated"
    assert client.get(f"/api/audits/{audit_id}/").json()["verdict"] == "provider_cheated"
