"""One peer must not break routing: a provider whose validly signed record claims every block
at an absurd throughput, but which fails every session it is offered (an error, silence, or a
ticket a free client cannot have, a malformed reply), is banned and routed around; free generation still works."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.model import DistributedModelForCausalLM
from client_sdk.swarm.routing import RouteHop
from client_sdk.swarm.session import ChainSession
from hivemart_core.errors import ProtocolError
from hivemart_core.models import load_model_info, load_tokenizer
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.rpc import OpenSession
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.hostile_agent import MODE_ENV, HostileSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CLAIM = ["--throughput", "1e12"]


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileSwarm]:
    """Two honest free providers covering the model; each test adds its hostile peer."""
    swarm = HostileSwarm(workdir=tmp_path_factory.mktemp("hostile"))
    try:
        swarm.start_bootstrap()
        swarm.start_agents(tiny_model, [(0, 2), (2, 4)], names=["honest-a", "honest-b"])
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("One peer must not break routing", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def expected(tiny_model: Path, prompt: torch.Tensor) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        return local.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)


def honest_peers(swarm: HostileSwarm) -> set[str]:
    return {a.peer_id for a in swarm.agents if a.name.startswith("honest")}


def generate_twice(
    tiny_model: Path, swarm: HostileSwarm, prompt: torch.Tensor, hostile: str, expected: torch.Tensor
) -> DistributedModelForCausalLM:
    """Two free generations by one client, both exact, the second never touching ``hostile``."""
    with SwarmRuntime(swarm.initial_peers) as runtime:
        model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
        model.bans = PeerBans(base_s=3600.0)  # generation sessions use it; a slow machine must not outlast the ban
        info = load_model_info(tiny_model)
        records = runtime.run(fetch_span_records(runtime.dht, info.model_id, range(info.num_blocks)))
        assert records[hostile].throughput == 1e12 and (records[hostile].start, records[hostile].end) == (0, 4)
        assert torch.equal(model.generate(prompt, max_new_tokens=8), expected)
        assert hostile in model.bans.banned()
        assert {hop.peer_id for hop in model.route()} == honest_peers(swarm)
        assert torch.equal(model.generate(prompt, max_new_tokens=8), expected)
        return model


@pytest.mark.parametrize("mode", ["bad_request", "silent", "malformed"])
def test_a_peer_failing_every_open_is_banned_and_routed_around(swarm, tiny_model, prompt, expected, mode, monkeypatch):
    monkeypatch.setenv(MODE_ENV, mode)
    hostile = swarm.start_hostile(tiny_model, 0, 4, name=f"hostile-{mode}", extra_args=CLAIM)
    try:
        if mode == "malformed":  # its malformed reply is a ProtocolError naming the field
            with SwarmRuntime(swarm.initial_peers) as runtime:
                spec = OpenSession(session_id="malformed-01", start=0, end=4, max_length=8)
                connection = ProviderConnection(runtime.p2p, hostile.peer_id)
                with pytest.raises(ProtocolError, match="'session_id'"):
                    runtime.run(connection.open_inference(spec, asyncio.Queue()))
        generate_twice(tiny_model, swarm, prompt, hostile.peer_id, expected)
    finally:
        swarm.stop_agent(hostile)


def test_a_ticket_requiring_peer_is_not_routed_to_by_free_clients(swarm, tiny_model, prompt, expected):
    platform = Identity.generate()
    paid = swarm.start_agent(
        tiny_model, 0, 4, name="paid-fast", extra_args=[*CLAIM, "--platform-key", platform.public_key.hex()]
    )
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            model.bans = PeerBans(base_s=3600.0)  # as above
            info = load_model_info(tiny_model)
            records = runtime.run(fetch_span_records(runtime.dht, info.model_id, range(info.num_blocks)))
            assert records[paid.peer_id].requires_ticket
            assert not any(records[p].requires_ticket for p in honest_peers(swarm))
            assert {hop.peer_id for hop in model.route()} == honest_peers(swarm)
            assert torch.equal(model.generate(prompt, max_new_tokens=8), expected)

            # A free session routed to it anyway (an old client, a record that lies) is refused
            # with ticket_required: that bans the peer and the session reroutes to free providers.
            hop = RouteHop(paid.peer_id, 0, 4, records[paid.peer_id])

            async def open_on_paid() -> list[str]:
                chain = ChainSession(runtime.p2p, [hop], max_length=16, find_route=model._find_route, bans=model.bans)
                await chain.open()
                try:
                    return [h.peer_id for h in chain.route]
                finally:
                    await chain.close()

            assert set(runtime.run(open_on_paid())) == honest_peers(swarm)
            assert paid.peer_id in model.bans.banned()
    finally:
        swarm.stop_agent(paid)
