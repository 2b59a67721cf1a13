"""Paid work end to end: tickets, receipts, shadow verification, settlement.

Real provider agents (subprocesses on loopback) that require tickets. The first tests sign
tickets with a test platform key and drive the client SDK alone (no marketplace); the last
ones run the whole flow against a live marketplace.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.models import load_model_info, load_tokenizer
from client_sdk.protocol.identity import Identity
from client_sdk.protocol.receipts import verify_receipt
from client_sdk.protocol.tickets import issue_ticket
from client_sdk.swarm.job import JobPlan, SwarmJob
from client_sdk.swarm.model import DistributedModelForCausalLM
from client_sdk.swarm.runtime import SwarmRuntime
from tests.swarm.cheating_agent import CheatingSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

PLATFORM = Identity.from_seed(bytes([11] * 32))
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def local_model(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("Receipts count every token", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def ticketed_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CheatingSwarm]:
    """Primaries p0 (0:2) and p1 (2:4), backups b0 and b1, and a cheater c0 (0:2); all ask for tickets."""
    swarm = CheatingSwarm(workdir=tmp_path_factory.mktemp("ticketed"))
    args = ["--platform-key", PLATFORM.public_key.hex(), "--receipt-every", "4"]
    try:
        swarm.start_bootstrap()
        swarm.start_cheater(tiny_model, 0, 2, name="c0", extra_args=args)
        swarm.start_agents(tiny_model, [(0, 2), (2, 4), (0, 2), (2, 4)], names=["p0", "p1", "b0", "b1"],
                           extra_args=args)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def runtime(ticketed_swarm: CheatingSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(ticketed_swarm.initial_peers) as runtime:
        yield runtime


def agent(swarm: CheatingSwarm, name: str) -> str:
    return next(a.peer_id for a in swarm.agents if a.name == name)


def signed_plan(swarm: CheatingSwarm, model_path: Path, client: Identity, segments: list[list[str]],
                job_id: int = 1) -> JobPlan:
    """Tickets as the marketplace would issue them for ``segments`` (names, primary first)."""
    info = load_model_info(model_path)
    entries = []
    for index, names in enumerate(segments):
        start, end = 2 * index, 2 * index + 2
        for rank, name in enumerate(names):
            peer = agent(swarm, name)
            ticket = issue_ticket(PLATFORM, ticket_id=f"tkt_{job_id}_{index}_{name}", job_id=job_id,
                                  client_key=client.public_key.hex(), provider_peer=peer, model_id=info.model_id,
                                  model_digest="0" * 64, start=start, end=end, max_units=1_000_000, price=1000,
                                  expires_at=int(time.time()) + 600)
            entries.append({"segment": index, "role": "backup" if rank else "primary", "rank": rank,
                            "provider_peer": peer, "start": start, "end": end, "ticket": ticket.to_dict()})
    return JobPlan.from_tickets(entries, platform_key=PLATFORM.public_key, job_id=job_id,
                                client_key=client.public_key.hex(), model_id=info.model_id)


def local_greedy(local_model: AutoModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return local_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def test_unticketed_requests_are_refused(tiny_model, runtime, local_model, prompt):
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    with pytest.raises(Exception, match="ticket"):
        model.generate(prompt, max_new_tokens=2)


def test_a_job_routes_by_its_plan_and_countersigns_every_receipt(ticketed_swarm, tiny_model, runtime, local_model,
                                                                  prompt):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["p0", "b0"], ["p1", "b1"]])
    job = SwarmJob(plan, client, job_id=1, verify_rate=1.0, rng=random.Random(0))
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    assert [h.peer_id for h in model.route()] == [agent(ticketed_swarm, "p0"), agent(ticketed_swarm, "p1")]
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), local_greedy(local_model, prompt, NEW_TOKENS))

    summary = job.summary()
    assert summary["receipts"]["refused"] == {}, job.collector.problems
    steps = NEW_TOKENS  # the prompt, then one token per step but the last
    # Every step of both hops was re-run on the backups, and honest providers agree.
    assert summary["verification"] == {"checked": 2 * steps, "mismatches": 0, "skipped": 0, "caught": []}
    by_peer: dict[str, int] = {}
    for receipt in job.collector.latest.values():
        ticket = plan.ticket_for(receipt.provider_peer, 0, 2) or plan.ticket_for(receipt.provider_peer, 2, 4)
        assert verify_receipt(receipt.to_dict(), ticket, require_client_signature=True) == receipt
        by_peer[receipt.provider_peer] = by_peer.get(receipt.provider_peer, 0) + receipt.units
    tokens = prompt.shape[1] + NEW_TOKENS - 1
    # The primaries' final receipts (sent on close) cover every token through their 2 blocks.
    assert by_peer[agent(ticketed_swarm, "p0")] == by_peer[agent(ticketed_swarm, "p1")] == tokens * 2
    # The backups were paid for the verification forwards: the whole prefix at every step.
    prefixes = sum(prompt.shape[1] + i for i in range(steps))
    assert by_peer[agent(ticketed_swarm, "b0")] == by_peer[agent(ticketed_swarm, "b1")] == prefixes * 2


def test_a_cheater_is_caught_reported_and_replaced(ticketed_swarm, tiny_model, runtime, local_model, prompt):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["c0", "b0"], ["p1", "b1"]], job_id=2)
    rate = 0.5
    reported = []

    def file_audit(mismatch):
        reported.append(mismatch)
        return len(reported)

    job = SwarmJob(plan, client, job_id=2, verify_rate=rate, rng=random.Random(7), file_audit=file_audit)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
        failovers = list(session.chain.failovers)
    cheater = agent(ticketed_swarm, "c0")
    assert job.mismatches == 1 and job.excluded == {cheater}
    [mismatch] = reported
    assert (mismatch.peer_id, mismatch.reference_peer, mismatch.start, mismatch.end) == (
        cheater, agent(ticketed_swarm, "b0"), 0, 2)
    assert mismatch.ticket.provider_peer == cheater and not mismatch.comparison.matches
    [failover] = failovers
    assert failover["peer_id"] == cheater and failover["replacement"] == [agent(ticketed_swarm, "b0"),
                                                                          agent(ticketed_swarm, "p1")]
    caught_at = 1 + (0 if failover["position"] == 0 else failover["position"] - prompt.shape[1] + 1)
    assert caught_at <= 3 / rate  # 95% of cheaters are caught within 3/r steps (here: seeded)
    # From the step that caught it on, the tokens are what honest blocks compute from the same history.
    first = prompt.shape[1] + caught_at - 1
    with torch.inference_mode():
        logits = local_model(tokens).logits
    assert torch.equal(tokens[0, first:], logits[0, first - 1 : -1].argmax(-1))


def test_forward_and_backward_are_billed_per_chunk_lane(ticketed_swarm, tiny_model, runtime):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["p0", "b0"], ["p1", "b1"]], job_id=3)
    job = SwarmJob(plan, client, job_id=3, verify_rate=0.0)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    model.remote.max_chunk_tokens = 8  # two chunks of 2 x 4 tokens, concurrently
    hidden = model.parts.embed(torch.randint(0, 100, (4, 4))).detach().requires_grad_(True)
    output = model.run_blocks(hidden)
    output.pow(2).mean().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert job.collector.problems == []
    # Two lanes x two providers; each lane: a forward (8 tokens x 2 blocks) and a backward (double).
    units = sorted(r.units for r in job.collector.latest.values())
    assert units == [8 * 2 + 2 * 8 * 2] * 4
