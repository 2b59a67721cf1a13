"""SpanBackend.inference_steps: decode steps of several sessions as one batched forward give
what each session's own steps give, whatever their positions, rollbacks and batch sizes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hivemart_core.models.backend import SpanBackend, SpanKVCache
from tests.models.conftest import ARCH_SHAPES

HIDDEN = 64
# A batched matrix product may sum in another order than a one-row product: equal up to rounding.
TOLERANCE = dict(atol=1e-5, rtol=0.0)


def _cache(backend: SpanBackend, batch: int = 1) -> SpanKVCache:
    return backend.new_cache(start=backend.start, end=backend.end, batch_size=batch, max_length=32)


def _prefilled(backend: SpanBackend, sequence: torch.Tensor, length: int) -> SpanKVCache:
    cache = _cache(backend, sequence.shape[0])
    backend.inference_step(cache, sequence[:, :length], 0, backend.start, backend.end)
    return cache


@pytest.fixture(scope="module")
def sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # Sessions of batch 1, 1, 2 and 1 whose prompts have different lengths.
    return [torch.randn(batch, 12, HIDDEN, generator=generator) for batch in (1, 1, 2, 1)]


PROMPTS = [3, 7, 1, 5]


@pytest.mark.parametrize("arch", sorted(ARCH_SHAPES))
def test_batched_decode_steps_at_different_positions_equal_each_sessions_own_steps(
    make_model: Callable[..., Path], sequences: list[torch.Tensor], arch: str
) -> None:
    backend = SpanBackend(make_model(**ARCH_SHAPES[arch]), 0, 3)
    alone = [_prefilled(backend, s, n) for s, n in zip(sequences, PROMPTS, strict=True)]
    together = [_prefilled(backend, s, n) for s, n in zip(sequences, PROMPTS, strict=True)]
    for i in range(4):
        expected = [
            backend.inference_step(c, s[:, n + i : n + i + 1], n + i, 0, 3)
            for c, s, n in zip(alone, sequences, PROMPTS, strict=True)
        ]
        got = backend.inference_steps(
            [(c, s[:, n + i : n + i + 1], n + i) for c, s, n in zip(together, sequences, PROMPTS, strict=True)], 0, 3
        )
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, **TOLERANCE)
    assert [c.length for c in together] == [n + 4 for n in PROMPTS]
    # What each session's cache holds is what its own steps stored: it can go on alone.
    for a, t in zip(alone, together, strict=True):
        torch.testing.assert_close(t.keys[0][:, :, : t.length], a.keys[0][:, :, : a.length], **TOLERANCE)


def test_batched_steps_match_local_transformers(make_model: Callable[..., Path]) -> None:
    path = make_model(arch="llama", kv_heads=2)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Blocks 0:2 of 3: the last hidden state transformers reports is after the final norm.
    backend = SpanBackend(path, 0, 2)
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 300, (1, n + 3), generator=generator) for n in (2, 6, 4)]
    embeds = [local.model.embed_tokens(t).detach() for t in tokens]
    caches = [_prefilled(backend, e, n) for e, n in zip(embeds, (2, 6, 4), strict=True)]
    outputs: list[list[torch.Tensor]] = [[], [], []]
    for i in range(3):
        steps = [(c, e[:, n + i : n + i + 1], n + i) for c, e, n in zip(caches, embeds, (2, 6, 4), strict=True)]
        for out, got in zip(outputs, backend.inference_steps(steps, 0, 2), strict=True):
            out.append(got)
    with torch.no_grad():
        for t, n, out in zip(tokens, (2, 6, 4), outputs, strict=True):
            expected = local.model(t, output_hidden_states=True).hidden_states[2][:, n:]
            torch.testing.assert_close(torch.cat(out, dim=1), expected, **TOLERANCE)


def test_a_rollback_in_one_session_does_not_disturb_the_others_in_its_batch(
    make_model: Callable[..., Path], sequences: list[torch.Tensor]
) -> None:
    backend = SpanBackend(make_model(arch="llama", kv_heads=2), 0, 3)
    steady, rolled = sequences[0], sequences[1]
    steady_cache, rolled_cache = _prefilled(backend, steady, 3), _prefilled(backend, rolled, 7)
    backend.inference_steps([(steady_cache, steady[:, 3:4], 3), (rolled_cache, rolled[:, 7:8], 7)], 0, 3)
    # The second session goes back to position 4 (dropping 4..7) with other hidden states.
    other = torch.full_like(rolled[:, :1], 0.5)
    got_steady, got_rolled = backend.inference_steps(
        [(steady_cache, steady[:, 4:5], 4), (rolled_cache, other, 4)], 0, 3
    )
    assert rolled_cache.length == 5 and steady_cache.length == 5
    reference_steady = _prefilled(backend, steady, 4)
    torch.testing.assert_close(
        got_steady, backend.inference_step(reference_steady, steady[:, 4:5], 4, 0, 3), **TOLERANCE
    )
    reference_rolled = _prefilled(backend, rolled, 4)
    torch.testing.assert_close(got_rolled, backend.inference_step(reference_rolled, other, 4, 0, 3), **TOLERANCE)


def test_one_step_alone_takes_the_unbatched_path_bit_for_bit(
    make_model: Callable[..., Path], sequences: list[torch.Tensor]
) -> None:
    backend = SpanBackend(make_model(arch="llama", kv_heads=2), 0, 3)
    seq = sequences[0]
    a, b = _prefilled(backend, seq, 5), _prefilled(backend, seq, 5)
    (got,) = backend.inference_steps([(a, seq[:, 5:6], 5)], 0, 3)
    assert torch.equal(got, backend.inference_step(b, seq[:, 5:6], 5, 0, 3))


def test_batched_steps_refuse_what_they_cannot_batch(
    make_model: Callable[..., Path], sequences: list[torch.Tensor]
) -> None:
    backend = SpanBackend(make_model(arch="llama", kv_heads=2), 0, 3)
    seq = sequences[0]
    a, b = _prefilled(backend, seq, 3), _prefilled(backend, seq, 3)
    with pytest.raises(ValueError, match="one token per session"):
        backend.inference_steps([(a, seq[:, 3:5], 3), (b, seq[:, 3:4], 3)], 0, 3)
    with pytest.raises(ValueError, match="only one step"):
        backend.inference_steps([(a, seq[:, 3:4], 3), (a, seq[:, 3:4], 3)], 0, 3)
    short = backend.new_cache(start=0, end=3, batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="does not fit"):
        backend.inference_steps([(a, seq[:, 3:4], 3), (short, seq[:, 4:5], 4)], 0, 3)
    other_blocks = backend.new_cache(start=1, end=3, batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="same blocks"):
        backend.inference_steps([(a, seq[:, 3:4], 3), (other_blocks, seq[:, 0:1], 0)], 0, 3)


def test_padded_sessions_batched_match_local_transformers_with_an_attention_mask(
    make_model: Callable[..., Path],
) -> None:
    """Left-padded sessions (rows of different lengths in one session) keep their padding
    masked and their position ids counted from their first real token in a batched step too,
    as transformers does with ``attention_mask``; beside them an unpadded session."""
    path = make_model(arch="llama", kv_heads=2)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    backend = SpanBackend(path, 0, 2)
    generator = torch.Generator().manual_seed(2)
    padded, plain = (
        torch.randint(4, 300, (2, 8), generator=generator),
        torch.randint(4, 300, (1, 6), generator=generator),
    )
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # row 1 has three padding tokens before its 2 real prompt tokens
    prompt = 5
    padded_cache, plain_cache = _cache(backend, 2), _cache(backend)
    padded_embeds, plain_embeds = (local.model.embed_tokens(t).detach() for t in (padded, plain))
    padded_cache.prepare_step(0, prompt, mask[:, :prompt].bool())
    backend.inference_step(padded_cache, padded_embeds[:, :prompt], 0, 0, 2)
    backend.inference_step(plain_cache, plain_embeds[:, :3], 0, 0, 2)
    outputs = []
    for i in range(3):
        padded_cache.prepare_step(prompt + i, 1)
        got, _ = backend.inference_steps(
            [
                (padded_cache, padded_embeds[:, prompt + i : prompt + i + 1], prompt + i),
                (plain_cache, plain_embeds[:, 3 + i : 4 + i], 3 + i),
            ],
            0,
            2,
        )
        outputs.append(got)
    with torch.no_grad():
        states = local.model(padded, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(torch.cat(outputs, dim=1), states[:, prompt:], **TOLERANCE)


def test_a_reorder_keeps_the_chosen_rows_of_the_cache(make_model: Callable[..., Path]) -> None:
    backend = SpanBackend(make_model(arch="llama", kv_heads=2), 0, 2)
    sequence = torch.randn(3, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    reordered = _prefilled(backend, sequence, 4)
    reordered.prepare_step(4, 1, reorder=torch.tensor([2, 2, 0]))
    got = backend.inference_step(reordered, sequence[[2, 2, 0], 4:5], 4, 0, 2)
    expected = backend.inference_step(_prefilled(backend, sequence[[2, 2, 0]], 4), sequence[[2, 2, 0], 4:5], 4, 0, 2)
    torch.testing.assert_close(got, expected, **TOLERANCE)
