"""Agents started without --blocks place themselves where the swarm is weakest, and move."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import create_model, load_model_info, load_tokenizer
from hivemart_core.protocol.records import ServerState
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def eight_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_model(
        tmp_path_factory.mktemp("models") / "eight", arch="llama", hidden=64, layers=8, heads=4, kv_heads=2, seed=1
    )


def exact(model_path: Path, runtime: SwarmRuntime) -> bool:
    prompt = load_tokenizer(model_path)("Placement fills the holes", return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = local.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
    return torch.equal(model.generate(prompt, max_new_tokens=10), expected)


def test_three_agents_joining_an_eight_block_model_cover_it(eight_blocks: Path, tmp_path: Path):
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        agents = [swarm.start_placed_agent(eight_blocks, 3) for _ in range(3)]
        spans = [(agent.ready["start"], agent.ready["end"]) for agent in agents]
        assert spans == [(0, 3), (3, 6), (5, 8)]  # holes first, the weakest window each time
        with SwarmRuntime(swarm.initial_peers) as runtime:
            records = runtime.run(fetch_span_records(runtime.dht, load_model_info(eight_blocks).model_id, range(8)))
            covered = {b for r in records.values() for b in range(r.start, r.end)}
            assert covered == set(range(8))
            assert exact(eight_blocks, runtime)


def test_an_agent_moves_to_the_blocks_nobody_serves(eight_blocks: Path, tmp_path: Path):
    model_id = load_model_info(eight_blocks).model_id
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        mover = swarm.start_placed_agent(
            eight_blocks, 4, extra_args=["--rebalance-period", "1", "--announce-period", "1"]
        )
        assert (mover.ready["start"], mover.ready["end"]) == (0, 4)
        swarm.start_agent(eight_blocks, 0, 4)  # now 0:4 is served twice and 4:8 by nobody
        with SwarmRuntime(swarm.initial_peers) as runtime:
            deadline = time.monotonic() + 60
            record = None
            while time.monotonic() < deadline:
                record = runtime.run(fetch_span_records(runtime.dht, model_id, range(8))).get(mover.peer_id)
                if record is not None and (record.start, record.end) == (4, 8):
                    break
                time.sleep(0.5)
            assert record is not None and (record.start, record.end, record.state) == (4, 8, ServerState.ONLINE)
            assert exact(eight_blocks, runtime)


@pytest.mark.django_db(transaction=True)
def test_an_agent_asks_the_marketplace_where_it_is_needed(eight_blocks: Path, tmp_path: Path, live_server):
    from marketplace.accounts.services import api_key_create
    from tests.marketplace.factories import make_model, make_provider, make_user

    info = load_model_info(eight_blocks)
    catalogued = make_model(model_id=info.model_id, num_blocks=8, hidden_size=64)
    # The marketplace knows a provider of blocks 0:4 that has not joined this DHT: only the
    # marketplace's answer (4:8) differs from what the empty DHT would suggest (0:4).
    make_provider(model=catalogued, start=0, end=4)
    key = api_key_create(user=make_user()).raw
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        agent = swarm.start_placed_agent(eight_blocks, 4, extra_args=["--market", live_server.url, "--api-key", key])
        assert (agent.ready["start"], agent.ready["end"]) == (4, 8)
        # An unreachable marketplace is not fatal: the agent falls back to the DHT.
        fallback = swarm.start_placed_agent(
            eight_blocks, 4, extra_args=["--market", "http://127.0.0.1:9", "--api-key", key]
        )
        assert (fallback.ready["start"], fallback.ready["end"]) == (0, 4)
