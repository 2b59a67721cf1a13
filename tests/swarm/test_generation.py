"""Distributed generation and autograd give what local transformers gives, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import load_tokenizer
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def local_model(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("The swarm serves blocks of a model", return_tensors="pt").input_ids


def local_greedy(local_model: AutoModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return local_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def distributed(tiny_model: Path, runtime: SwarmRuntime, push: bool = True) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime, push=push)


@pytest.mark.parametrize("push", [True, False], ids=["push", "round-trip"])
def test_greedy_generation_through_two_providers_matches_local(tiny_model, runtime2, local_model, prompt, push):
    model = distributed(tiny_model, runtime2, push=push)
    assert [(h.start, h.end) for h in model.route()] == [(0, 2), (2, 4)]
    expected = local_greedy(local_model, prompt, NEW_TOKENS)
    assert expected.shape[1] == prompt.shape[1] + NEW_TOKENS
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), expected)


def test_greedy_generation_through_three_providers_matches_local(tiny_model, local_model, prompt, tmp_path):
    swarm = start_swarm(tiny_model, [(0, 1), (1, 3), (3, 4)], tmp_path)
    try:
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = distributed(tiny_model, runtime)
            assert [(h.start, h.end) for h in model.route()] == [(0, 1), (1, 3), (3, 4)]
            expected = local_greedy(local_model, prompt, NEW_TOKENS)
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), expected)
    finally:
        swarm.stop()


def test_step_logits_match_local_within_1e4(tiny_model, runtime2, local_model, prompt):
    model = distributed(tiny_model, runtime2)
    tokens = local_greedy(local_model, prompt, 8)
    with torch.no_grad():
        expected = local_model(tokens).logits
    with model.inference_session(max_length=tokens.shape[1]) as session:
        # the prompt as one step, then one token per step, as generation does
        chunks = [tokens[:, : prompt.shape[1]]] + [
            tokens[:, i : i + 1] for i in range(prompt.shape[1], tokens.shape[1])
        ]
        got = []
        for chunk in chunks:
            hidden = runtime2.run(session.chain.step(model.parts.embed(chunk)))
            got.append(model.parts.logits(hidden))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=0)


def test_repeated_generate_calls_in_one_session_continue_exactly(tiny_model, runtime2, local_model, prompt):
    model = distributed(tiny_model, runtime2)
    expected = local_greedy(local_model, prompt, 12)
    with model.inference_session(max_length=prompt.shape[1] + 12) as session:
        first = model.generate(prompt, max_new_tokens=5, session=session)
        rest = model.generate(None, max_new_tokens=7, session=session)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


def test_sampling_is_reproducible_with_a_generator(tiny_model, runtime2, prompt):
    model = distributed(tiny_model, runtime2)
    runs = [
        model.generate(
            prompt,
            max_new_tokens=10,
            do_sample=True,
            temperature=1.5,
            top_k=50,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(prompt, max_new_tokens=10)
    assert runs[0].shape == greedy.shape


def test_gradients_through_remote_blocks_match_local(tiny_model, runtime2, local_model, prompt):
    model = distributed(tiny_model, runtime2)
    batch = torch.cat([prompt, prompt.flip(1)], dim=0)
    targets = batch.roll(-1, dims=1)

    local_embeds = local_model.get_input_embeddings()(batch).detach().requires_grad_(True)
    local_logits = local_model(inputs_embeds=local_embeds).logits
    torch.nn.functional.cross_entropy(local_logits.flatten(0, 1), targets.flatten()).backward()

    embeds = model.parts.embed(batch).detach().requires_grad_(True)
    logits = model.parts.logits(model.run_blocks(embeds))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    torch.testing.assert_close(logits, local_logits, atol=1e-4, rtol=0)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    torch.testing.assert_close(embeds.grad, local_embeds.grad, atol=1e-5, rtol=1e-3)
