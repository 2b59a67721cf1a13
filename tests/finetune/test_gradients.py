"""Gradients through real providers match local transformers (+ PEFT) within tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.finetune.conftest import local_peft, make_lora, peft_grads

pytestmark = pytest.mark.swarm


def batch(seed: int, rows: int = 4, tokens: int = 12, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_input_grads_match_local_with_concurrent_chunks(model, local_model):
    ids = batch(0)
    model.remote.max_chunk_tokens = 24  # 2 rows per chunk: two chunks run concurrently
    try:
        embeds = model.parts.embed(ids).detach().requires_grad_(True)
        logits = model.parts.logits(model.run_blocks(embeds))
        lm_loss(logits, ids).backward()
    finally:
        model.remote.max_chunk_tokens = 4096
    local_embeds = local_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    local_logits = local_model(inputs_embeds=local_embeds).logits
    lm_loss(local_logits, ids).backward()
    torch.testing.assert_close(logits, local_logits, atol=1e-4, rtol=0)
    assert embeds.grad.abs().sum() > 0
    torch.testing.assert_close(embeds.grad, local_embeds.grad, atol=1e-5, rtol=1e-3)


def add_deep_prompts(local_model, prompts: torch.Tensor) -> list:
    """Hooks that make local decoder layers add ``prompts[i]`` to their first positions."""

    def hook(index: int):
        def pre(module, args, kwargs):
            hidden = args[0]
            prefix = prompts.shape[2]
            hidden = torch.cat([hidden[:, :prefix] + prompts[index], hidden[:, prefix:]], dim=1)
            return (hidden, *args[1:]), kwargs

        return pre

    return [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(local_model.model.layers)
    ]


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_deep_prompt_grads_match_local(model, local_model, per_row):
    ids = batch(1)
    shape = (4, ids.shape[0] if per_row else 1, 3, 64)
    prompts = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.5).requires_grad_(True)
    model.remote.max_chunk_tokens = 24
    try:
        logits = model(ids, deep_prompts=prompts)
        lm_loss(logits, ids).backward()
    finally:
        model.remote.max_chunk_tokens = 4096

    local_prompts = prompts.detach().clone().requires_grad_(True)
    hooks = add_deep_prompts(local_model, local_prompts)
    try:
        local_logits = local_model(ids).logits
        lm_loss(local_logits, ids).backward()
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(logits, local_logits, atol=1e-4, rtol=0)
    assert prompts.grad.abs().sum() > 0
    torch.testing.assert_close(prompts.grad, local_prompts.grad, atol=1e-5, rtol=1e-3)


def test_lora_grads_and_logits_match_peft(model, tiny_model: Path):
    lora = make_lora(tiny_model, targets=("q_proj", "v_proj", "down_proj"), random_b=True)
    ids = batch(3)
    logits = model(ids, lora=lora)
    lm_loss(logits, ids).backward()

    reference = local_peft(tiny_model, lora)
    local_logits = reference(input_ids=ids).logits
    lm_loss(local_logits, ids).backward()
    torch.testing.assert_close(logits, local_logits, atol=1e-4, rtol=0)
    expected = peft_grads(reference, lora)
    assert lora.weights.grad is not None and expected.abs().sum() > 0
    torch.testing.assert_close(lora.weights.grad, expected, atol=1e-5, rtol=1e-3)
    # Each hop holds a copy of its span's rows, uploaded (the master is not the seed's).
    assert {(start, end) for _, start, end in lora.placements()} == {(0, 2), (2, 4)}
    model.runtime.run(lora.release(model.runtime.p2p))


def test_seeded_adapter_is_created_from_the_seed_and_updates_reach_providers(model, tiny_model: Path, local_model):
    lora = make_lora(tiny_model, seed=7)  # B = 0: outputs are the base model's until a step
    ids = batch(4)
    with torch.no_grad():
        base = local_model(ids).logits
    logits = model(ids, lora=lora)
    torch.testing.assert_close(logits, base, atol=1e-4, rtol=0)
    lm_loss(logits, ids).backward()
    assert lora.weights.grad[:, :].abs().sum() > 0  # B's gradient is non-zero even at B = 0
    optimizer = torch.optim.SGD([lora.weights], lr=1.0)
    optimizer.step()
    with torch.no_grad():
        stepped = model(ids, lora=lora)
        reference = local_peft(tiny_model, lora)(input_ids=ids).logits
    assert (stepped - base).abs().max() > 1e-3
    torch.testing.assert_close(stepped, reference, atol=1e-4, rtol=0)
    model.runtime.run(lora.release(model.runtime.p2p))
