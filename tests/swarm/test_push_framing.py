"""Framing through push chains: the hop whose output differs from what the next hop received
is the one blamed, and an honest neighbour never is.

Real agents (subprocesses on loopback) that require tickets; adversaries from
``tests.swarm.framing_agent``. Blocks 0:2 then 2:4 of the tiny model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.job import SwarmJob
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import load_tokenizer
from hivemart_core.protocol.commitments import equivocation
from hivemart_core.protocol.identity import Identity
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.framing_agent import LIAR_MODE_ENV, AdversarySwarm
from tests.swarm.test_settlement_e2e import PLATFORM, agent, local_greedy, signed_plan

# Six processes (and their p2p daemons) start with the module: on a loaded machine that alone takes minutes.
pytestmark = [pytest.mark.swarm, pytest.mark.slow, pytest.mark.timeout(900)]

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def local_model(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("Who pushed what to whom", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdversarySwarm]:
    """Honest p0 (0:2) and p1 (2:4); framers f0 and u0 (0:2); a liar l1 (2:4), whose forwards (what
    verification runs on it) are honest. All ask for tickets."""
    workdir = tmp_path_factory.mktemp("framing")
    swarm = AdversarySwarm(workdir=workdir)
    args = ["--platform-key", PLATFORM.public_key.hex(), "--receipt-every", "4"]
    try:
        swarm.start_bootstrap()
        swarm.start_adversary(tiny_model, 0, 2, name="f0", adversary="framer", extra_args=args)
        swarm.start_adversary(tiny_model, 0, 2, name="u0", adversary="framer-unsigned", extra_args=args)
        swarm.start_adversary(
            tiny_model,
            2,
            4,
            name="l1",
            adversary="liar",
            env={LIAR_MODE_ENV: str(workdir / "liar.mode")},
            extra_args=args,
        )
        swarm.start_agents(tiny_model, [(0, 2), (2, 4)], names=["p0", "p1"], extra_args=args)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def runtime(swarm: AdversarySwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(swarm.initial_peers) as runtime:
        yield runtime


def run_job(
    swarm: AdversarySwarm,
    tiny_model: Path,
    runtime: SwarmRuntime,
    prompt: torch.Tensor,
    segments: list[list[str]],
    *,
    job_id: int,
    verify_rate: float,
) -> tuple[SwarmJob, torch.Tensor, list, list]:
    """Generate through a job planned on ``segments``; returns the job, the tokens, the final
    route, the session's failovers, and what the job filed for audit."""
    client = Identity.generate()
    filed: list = []
    job = SwarmJob(
        signed_plan(swarm, tiny_model, client, segments, job_id=job_id),
        client,
        job_id=job_id,
        verify_rate=verify_rate,
        rng=random.Random(job_id),
        file_audit=filed.append,
    )
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
        route = [hop.peer_id for hop in session.chain.route]
        failovers = list(session.chain.failovers)
    return job, tokens, route, failovers, filed


@pytest.mark.parametrize("verify_rate", [1.0, 0.05])
def test_a_framer_is_caught_excluded_and_reported_and_its_honest_neighbour_is_not(
    swarm, tiny_model, runtime, local_model, prompt, verify_rate
):
    job, tokens, route, failovers, filed = run_job(
        swarm,
        tiny_model,
        runtime,
        prompt,
        [["f0", "p0"], ["p1", "l1"]],
        job_id=10 + int(verify_rate * 100),
        verify_rate=verify_rate,
    )
    framer, neighbour = agent(swarm, "f0"), agent(swarm, "p1")
    # Caught on the first step, before its noise reached a token.
    assert torch.equal(tokens, local_greedy(local_model, prompt, NEW_TOKENS))
    assert job.excluded == {framer}
    # Verification (by l1, on a planned reference) never ran the neighbour on inputs it did not get.
    assert job.mismatches == 0 and (verify_rate < 1 or job.steps_verified > 0)
    [caught] = job.equivocations
    assert (caught.peer_id, caught.relayed_by, caught.start, caught.end) == (framer, neighbour, 0, 2)
    assert caught.ticket.provider_peer == framer
    # The evidence convinces anyone holding the framer's peer id: two records it signed for one step.
    assert equivocation(caught.returned.to_dict(), caught.pushed.to_dict())
    assert caught.returned.output_digest != caught.pushed.output_digest
    assert filed == [caught]  # the only report: none against the neighbour
    assert [f["peer_id"] for f in failovers] == [framer]
    assert route == [agent(swarm, "p0"), neighbour]  # the neighbour keeps serving the job
    assert job.collector.problems == []


def test_a_framer_pushing_an_unsigned_output_is_refused_downstream(swarm, tiny_model, runtime, local_model, prompt):
    job, tokens, route, failovers, filed = run_job(
        swarm, tiny_model, runtime, prompt, [["u0", "p0"], ["p1", "l1"]], job_id=20, verify_rate=1.0
    )
    # The neighbour refused the push and said who sent it: the pusher is routed around.
    assert torch.equal(tokens, local_greedy(local_model, prompt, NEW_TOKENS))
    assert [f["peer_id"] for f in failovers] == [agent(swarm, "u0")] and "bad_push" in failovers[0]["reason"]
    assert route == [agent(swarm, "p0"), agent(swarm, "p1")]
    assert job.excluded == set() and job.mismatches == 0 and filed == []  # a refusal is no proof


@pytest.mark.parametrize("mode", ["keep", "forge", "drop"])
def test_a_downstream_lying_about_its_input_cannot_frame_its_upstream(
    swarm, tiny_model, runtime, local_model, prompt, mode
):
    (swarm.workdir / "liar.mode").write_text(mode)
    job, tokens, route, failovers, filed = run_job(
        swarm,
        tiny_model,
        runtime,
        prompt,
        [["p0"], ["l1", "p1"]],
        job_id=30 + ["keep", "forge", "drop"].index(mode),
        verify_rate=1.0,
    )
    liar, upstream = agent(swarm, "l1"), agent(swarm, "p0")
    assert torch.equal(tokens, local_greedy(local_model, prompt, NEW_TOKENS))
    # It cannot show a record the upstream signed for the input it claims: it is the one excluded.
    assert job.excluded == {liar}
    assert job.equivocations == [] and filed == [] and job.mismatches == 0
    assert [f["peer_id"] for f in failovers] == [liar]
    assert route == [upstream, agent(swarm, "p1")]


def test_a_provider_answering_at_another_position_than_asked_is_failed_over(
    swarm, tiny_model, runtime, local_model, prompt
):
    # Its outputs are right and its records are validly signed, but they say it computed each
    # step at another position than the client sent it at: the client must not keep them.
    (swarm.workdir / "liar.mode").write_text("position")
    job, tokens, route, failovers, filed = run_job(
        swarm, tiny_model, runtime, prompt, [["p0"], ["l1", "p1"]], job_id=40, verify_rate=0.0
    )
    liar = agent(swarm, "l1")
    assert torch.equal(tokens, local_greedy(local_model, prompt, NEW_TOKENS))
    assert [f["peer_id"] for f in failovers] == [liar]
    assert "position" in failovers[0]["reason"]
    assert route == [agent(swarm, "p0"), agent(swarm, "p1")]
