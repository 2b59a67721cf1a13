"""Provider agents and a live marketplace: platform key, registration, heartbeats, receipt uploads.

Real agent processes talk to a real marketplace (pytest-django's ``live_server``, on the
test database) over HTTP, and to a raw client over the swarm.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import torch
from hivemind.p2p import PeerID

from client_sdk.swarm.local import AgentProcess, AgentSpec, LocalSwarm
from hivemart_core.models import compute_digests, load_model_info
from hivemart_core.protocol.framing import Message, read_message, write_message
from hivemart_core.protocol.identity import Identity, public_key_from_peer_id
from hivemart_core.protocol.receipts import ReceiptCounter, tensor_digest, verify_receipt, work_units
from hivemart_core.protocol.rpc import RPC_FORWARD, SpanRequest
from hivemart_core.protocol.tickets import JobTicket
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

HIDDEN = 64


def ticketed_forward(
    runtime: SwarmRuntime, agent: AgentProcess, ticket: JobTicket | None, session_id: str, seed: int
) -> Message:
    async def call() -> Message:
        _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(agent.peer_id), RPC_FORWARD)
        try:
            header = SpanRequest(0, 4, ticket=ticket and ticket.to_dict(), session_id=session_id).to_header()
            hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(seed))
            await write_message(writer, header, (hidden,))
            return await asyncio.wait_for(read_message(reader), 30)
        finally:
            writer.close()

    return runtime.run(call())


@pytest.mark.django_db(transaction=True)
def test_agents_register_heartbeat_and_upload_their_receipts(tiny_model: Path, tmp_path: Path, live_server, settings):
    from marketplace.accounts.services import api_key_create
    from marketplace.jobs.models import Job
    from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store, job_transition
    from marketplace.providers.models import Provider
    from marketplace.receipts.models import Receipt, Ticket
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
    key = api_key_create(user=owner).raw
    market = ["--market", live_server.url, "--api-key", key, "--price", "700", "--heartbeat-period", "1"]

    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        # One agent uploads every second; the other only at its clean shutdown.
        periodic, at_exit = swarm.start_each(
            [
                AgentSpec("periodic", tiny_model, 0, 4, [*market, "--upload-period", "1"]),
                AgentSpec("at-exit", tiny_model, 0, 4, [*market, "--upload-period", "3600"]),
            ],
        )

        def online() -> dict[str, Provider] | None:
            found = {
                p.peer_id: p for p in Provider.objects.filter(user=owner, state="online", reported_throughput__gt=0)
            }
            return found if len(found) == 2 else None

        providers = wait_for("both agents to register and heartbeat", online)
        for agent in (periodic, at_exit):
            provider = providers[agent.peer_id]
            assert (provider.block_start, provider.block_end, provider.price, provider.gpu) == (0, 4, 700, "cpu")
            assert provider.public_key == public_key_from_peer_id(agent.peer_id).hex()

        client_key = Identity.generate()
        client = make_wallet(credits=10**7).user
        job, _ = job_create(
            user=client,
            kind="inference",
            model_id=info.model_id,
            budget=10**6,
            max_price=10**4,
            idempotency_key="market-link-test",
            client_key=client_key.public_key.hex(),
        )
        job_plan_store(
            job=job, segments=[SegmentSpec(0, 4, providers[periodic.peer_id], backups=[providers[at_exit.peer_id]])]
        )
        job_transition(job=job, to_state=Job.State.RUNNING)
        tickets = {
            t.provider.peer_id: JobTicket.from_dict(t.signed)
            for t in Ticket.objects.filter(job=job).select_related("provider")
        }
        assert all(t.provider_peer == peer for peer, t in tickets.items())

        expected: dict[str, ReceiptCounter] = {}
        with SwarmRuntime(swarm.initial_peers) as runtime:
            for agent in (periodic, at_exit):
                # The agents learnt the platform key from the marketplace: no ticket, no work.
                refused = ticketed_forward(runtime, agent, None, "session-0001", seed=0)
                assert refused.header.get("code") == "ticket_required", refused.header
                mirror = expected[agent.peer_id] = ReceiptCounter(tickets[agent.peer_id], "session-0001")
                for seed in range(2):
                    reply = ticketed_forward(runtime, agent, tickets[agent.peer_id], "session-0001", seed)
                    verify_receipt(reply.header["receipt"], tickets[agent.peer_id])
                    mirror.record(work_units(tokens=3, blocks=4), tensor_digest(reply.tensors[0]))

        def stored(agent: AgentProcess) -> Receipt | None:
            return Receipt.objects.filter(
                ticket__ticket_id=tickets[agent.peer_id].ticket_id, session_id="session-0001", seq=2
            ).first()

        receipt = wait_for("the periodic upload", lambda: stored(periodic))
        mirror = expected[periodic.peer_id]
        assert (receipt.units, receipt.steps, receipt.chain) == (mirror.units, mirror.steps, mirror.chain)
        assert receipt.client_signature == "" and receipt.uploaded_by_id == owner.pk  # the provider's own upload
        assert stored(at_exit) is None  # its upload period has not come yet

        assert swarm.stop_agent(at_exit, sig=signal.SIGTERM) == 0
        receipt = stored(at_exit)  # uploaded during the clean shutdown, before the process exited
        assert receipt is not None and (receipt.units, receipt.chain) == (24, expected[at_exit.peer_id].chain)
        assert Provider.objects.get(peer_id=at_exit.peer_id).state == "offline"  # said goodbye
        assert_default_logs(periodic)


def assert_default_logs(agent: AgentProcess) -> None:
    """An agent at the default verbosity (as started here, without -v) says what it does while it
    starts, says once that the marketplace sees it, and writes nothing per heartbeat."""
    log = agent.log_path.read_text()
    assert "\r" not in log
    for step in ("reading ", "joining the swarm through 1 initial peer", "loading blocks 0:4 of ", "loaded blocks 0:4"):
        assert step in log, (step, log)
    assert "measuring throughput" in log
    serving = next(line for line in log.splitlines() if "serving blocks 0:4 of" in line)
    assert agent.peer_id in serving and agent.maddrs[0] in serving
    assert log.count("online at the marketplace") == 1
    assert "HTTP Request" not in log and "heartbeat/" not in log, log  # httpx's line per heartbeat


def test_an_agent_that_cannot_reach_its_marketplace_serves_no_billable_work_for_free(tiny_model: Path, tmp_path: Path):
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        agent = swarm.start_agent(tiny_model, 0, 4, extra_args=["--market", "http://127.0.0.1:9"])
        with SwarmRuntime(swarm.initial_peers) as runtime:
            reply = ticketed_forward(runtime, agent, None, "session-0001", seed=0)
        # It does not know the platform key yet, so it cannot check tickets: clients go elsewhere.
        assert (reply.header["type"], reply.header["code"]) == ("error", "not_accepting")
        assert swarm.stop_agent(agent) == 0
