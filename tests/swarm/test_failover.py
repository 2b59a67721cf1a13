"""Failover: killed providers are replaced mid-generation and outputs stay exact."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.errors import ProtocolError
from hivemart_core.models import load_model_info, load_tokenizer
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import ServerRecord, ServerState, block_key, verify_record
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("Failover keeps the tokens exact", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def expected_100(tiny_model: Path, prompt: torch.Tensor) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        return local.generate(prompt, max_new_tokens=100, do_sample=False, eos_token_id=None, pad_token_id=0)


def agent_by_peer(swarm: LocalSwarm, peer_id: str):
    return next(a for a in swarm.agents if a.peer_id == peer_id)


def generate_killing(
    model: DistributedModelForCausalLM, swarm: LocalSwarm, prompt: torch.Tensor, kills: dict[int, tuple[int, int]]
) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Generate 100 tokens; after token N, SIGKILL whoever serves blocks ``kills[N]`` now.
    Returns the tokens, the session's failovers and the killed peers."""
    killed: list[str] = []
    with model.inference_session(max_length=prompt.shape[1] + 100) as session:
        produced = 0

        def on_token(_: torch.Tensor) -> None:
            nonlocal produced
            produced += 1
            if produced in kills:
                serving = next(h for h in session.chain.route if (h.start, h.end) == kills[produced])
                swarm.stop_agent(agent_by_peer(swarm, serving.peer_id), sig=signal.SIGKILL)
                killed.append(serving.peer_id)

        tokens = model.generate(prompt, max_new_tokens=100, session=session, on_token=on_token)
        return tokens, list(session.chain.failovers), killed


def failed_over(failovers: list[dict], peer_id: str) -> dict:
    """The failover that replaced ``peer_id`` (a slow machine may add unrelated ones)."""
    return next(f for f in failovers if f["peer_id"] == peer_id)


def test_sigkill_at_token_20_fails_over_to_the_backup_exactly(tiny_model, prompt, expected_100, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 2), (2, 4), (2, 4)], tmp_path)
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            tokens, failovers, killed = generate_killing(model, swarm, prompt, {20: (2, 4)})
            assert torch.equal(tokens, expected_100)
            assert failed_over(failovers, killed[0])["blocks"] == [2, 4]
            assert killed[0] in model.bans.banned()
    finally:
        swarm.stop()


def test_three_providers_for_the_same_blocks_two_killed_in_turn(tiny_model, prompt, expected_100, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 4), (0, 4), (0, 4)], tmp_path)
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            tokens, failovers, killed = generate_killing(model, swarm, prompt, {15: (0, 4), 60: (0, 4)})
            assert torch.equal(tokens, expected_100)
            assert len(set(killed)) == 2
            replacements = [failed_over(failovers, peer)["replacement"][0] for peer in killed]
            assert replacements[0] == killed[1] and replacements[1] not in killed
    finally:
        swarm.stop()


def test_a_middle_provider_killed_in_a_pushed_chain_is_replaced(tiny_model, prompt, expected_100, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 1), (1, 3), (3, 4), (1, 3)], tmp_path)
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            tokens, failovers, killed = generate_killing(model, swarm, prompt, {33: (1, 3)})
            assert torch.equal(tokens, expected_100)
            assert failed_over(failovers, killed[0])["blocks"] == [1, 3]
    finally:
        swarm.stop()


def test_a_forged_record_for_a_victims_peer_id_is_ignored(tiny_model, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 4)], tmp_path)
    try:
        victim = swarm.agents[0]
        info = load_model_info(tiny_model)
        attacker = Identity.generate()
        forged = ServerRecord(
            peer_id=victim.peer_id,
            model_id=info.model_id,
            start=0,
            end=4,
            state=ServerState.OFFLINE,
            throughput=1e9,
            dtype="float32",
            cache_tokens_left=10**6,
            expires_at=time.time() + 3600,
        )
        body = msgpack.packb({**forged.__dict__, "maddrs": []}, use_bin_type=True)
        forged_value = body + attacker.sign(body)
        with SwarmRuntime(swarm.initial_peers) as runtime:

            async def attack() -> dict:
                from hivemind.utils.timed_storage import get_dht_time

                stored = await runtime.dht.store(
                    block_key(info.model_id, 0), forged_value, get_dht_time() + 3600, subkey=victim.peer_id
                )
                return {"stored": stored, "records": await fetch_span_records(runtime.dht, info.model_id, range(4))}

            result = runtime.run(attack())
        assert result["stored"] is False  # every DHT node refused to store it
        records = result["records"]
        assert victim.peer_id in records and records[victim.peer_id].state == ServerState.ONLINE
        assert records[victim.peer_id].throughput < 1e9
        with pytest.raises(ProtocolError):  # and a client would drop it anyway
            verify_record(forged_value, subkey=victim.peer_id, model_id=info.model_id, block=0)
    finally:
        swarm.stop()


def test_a_client_starting_after_a_crash_does_not_wait_for_the_stale_record(tiny_model, prompt, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 4), (0, 4)], tmp_path)
    try:
        info = load_model_info(tiny_model)
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            # Crash whichever provider a new client would pick first, so it must route around it.
            doomed = model.route()[0].peer_id
            swarm.stop_agent(agent_by_peer(swarm, doomed), sig=signal.SIGKILL)
            assert doomed in runtime.run(fetch_span_records(runtime.dht, info.model_id, range(4)))

            first = model.generate(prompt, max_new_tokens=1)
            # The crashed provider's record had not expired when the first token came back.
            still_there = runtime.run(fetch_span_records(runtime.dht, info.model_id, range(4)))
            assert doomed in still_there
            assert first.shape[1] == prompt.shape[1] + 1
            assert doomed in model.bans.banned()
    finally:
        swarm.stop()


def test_a_provider_that_stops_answering_is_replaced_after_its_deadline(tiny_model, prompt, expected_100, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 4), (0, 4)], tmp_path)
    frozen = None
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            with model.inference_session(max_length=prompt.shape[1] + 100) as session:
                produced = 0

                def on_token(_: torch.Tensor) -> None:
                    nonlocal produced, frozen
                    produced += 1
                    if produced == 10:  # hung, not dead: its connections stay open
                        frozen = agent_by_peer(swarm, session.chain.route[0].peer_id)
                        frozen.process.send_signal(signal.SIGSTOP)

                tokens = model.generate(prompt, max_new_tokens=100, session=session, on_token=on_token)
                failovers = list(session.chain.failovers)
            assert torch.equal(tokens, expected_100)
            assert "no answer within" in failed_over(failovers, frozen.peer_id)["reason"]
    finally:
        if frozen is not None:
            frozen.process.send_signal(signal.SIGCONT)
        swarm.stop()


def test_a_padded_beam_search_fails_over_exactly(tiny_model, tmp_path):
    """The replacement gets the history with its padding masks and beam reorders, in order."""
    from transformers import LogitsProcessor, LogitsProcessorList

    tokenizer = load_tokenizer(tiny_model)
    tokenizer.padding_side = "left"
    batch = tokenizer(["Failover keeps padded beams exact", "Hi"], padding=True, return_tensors="pt")
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=12, num_beams=3)
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected = local.generate(**kwargs)
    swarm = start_swarm(tiny_model, [(0, 2), (2, 4), (2, 4)], tmp_path)
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            with model.inference_session(max_length=batch.input_ids.shape[1] + 12, batch_size=6) as session:

                class KillAtStep6(LogitsProcessor):
                    calls = 0

                    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                        KillAtStep6.calls += 1
                        if KillAtStep6.calls == 6:  # five reorders are in the history by now
                            serving = next(h for h in session.chain.route if (h.start, h.end) == (2, 4))
                            swarm.stop_agent(agent_by_peer(swarm, serving.peer_id), sig=signal.SIGKILL)
                        return scores

                got = model.generate(**kwargs, session=session, logits_processor=LogitsProcessorList([KillAtStep6()]))
                assert session.chain.failovers, "the killed provider was not replaced"
    finally:
        swarm.stop()
    assert torch.equal(got, expected)
