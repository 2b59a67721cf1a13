"""A paid streamed request whose client leaves mid-stream: providers that ask for tickets and
registered with a live marketplace, the gateway billing the caller's job; the job is finished
for the work done up to the disconnect, its receipts covering exactly the tokens generated."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from client_sdk.swarm.local import AgentSpec, LocalSwarm
from tests.serve.conftest import running
from tests.swarm.conftest import wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def plan_pending_jobs(providers: list[Any], stop: threading.Event) -> None:
    """The scheduler's part, as the settlement tests play it: plan each new job on ``providers``."""
    from django.db import connection

    from marketplace.jobs.models import Job
    from marketplace.jobs.services import SegmentSpec, job_plan_store

    try:
        while not stop.is_set():
            for job in Job.objects.filter(state="pending"):
                job_plan_store(job=job, segments=[SegmentSpec(0, 2, providers[0]), SegmentSpec(2, 4, providers[1])])
            time.sleep(0.1)
    finally:
        connection.close()


def test_a_client_leaving_mid_stream_pays_for_what_was_generated(
    tiny_model: Path, tmp_path: Path, live_server: Any, settings: Any
) -> None:
    from hivemart.serve.app import create_app
    from hivemart.serve.engine import MarketPayer, Served
    from hivemart_core.models import compute_digests, load_model_info
    from marketplace.accounts.services import api_key_create
    from marketplace.jobs.models import Job
    from marketplace.providers.models import Provider
    from marketplace.receipts.models import Receipt
    from tests.marketplace.factories import make_model, make_user, make_wallet
    from tests.marketplace.settlement import platform_key_file

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    info, digests = load_model_info(tiny_model), compute_digests(tiny_model)
    make_model(
        model_id=info.model_id,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
    )
    owner = make_user()
    args = ["--market", live_server.url, "--api-key", api_key_create(user=owner).raw, "--price", "1000000"]
    args += ["--heartbeat-period", "1", "--upload-period", "1", "--receipt-every", "4"]
    key = api_key_create(user=make_wallet(credits=10**9).user).raw
    stop = threading.Event()
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_each([AgentSpec("p0", tiny_model, 0, 2, args), AgentSpec("p1", tiny_model, 2, 4, args)])
        peers = [a.peer_id for a in swarm.agents]
        online = wait_for(
            "both agents online",
            lambda: (lambda found: found if len(found) == 2 else None)(
                {p.peer_id: p for p in Provider.objects.filter(user=owner, state="online")}
            ),
        )
        planner = threading.Thread(target=plan_pending_jobs, args=([online[p] for p in peers], stop), daemon=True)
        planner.start()
        served = Served.load(tiny_model, initial_peers=list(swarm.initial_peers), name="tiny")
        payer = MarketPayer(live_server.url, budget=50_000_000, max_price=2_000_000, plan_timeout=30)
        app = create_app(served, payer=payer, close_served=False)
        try:
            with running(app) as url:
                client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
                stream = client.completions.create(
                    model="tiny", prompt="Receipts count every token", max_tokens=400, temperature=0, stream=True
                )
                next(iter(stream))
                stream.close()  # the client leaves after its first chunk
                gateway = app.state.gateway
                outcome = wait_for(
                    "the request's outcome",
                    lambda: next((o for o in gateway.recent if o["status"] == "cancelled"), None),
                )
        finally:
            stop.set()
            planner.join(timeout=10)
            served.model.close()
    generated, prompt = outcome["completion_tokens"], outcome["prompt_tokens"]
    assert outcome["job"] is not None and outcome["job_state"] == "settling" and 1 <= generated < 400
    job = Job.objects.get(pk=outcome["job"])
    assert job.state == "settling"
    # Every position fed through the 4 blocks was receipted: the prompt, and each generated
    # token but the last (sampled, never fed back).
    wait_for("the receipts stored", lambda: Receipt.objects.filter(ticket__job_id=job.id).exists())
    units = {}
    for ticket_id, session_id, n in Receipt.objects.filter(ticket__job_id=job.id).values_list(
        "ticket__ticket_id", "session_id", "units"
    ):
        units[(ticket_id, session_id)] = max(units.get((ticket_id, session_id), 0), n)
    assert sum(units.values()) == 4 * (prompt + generated - 1)
