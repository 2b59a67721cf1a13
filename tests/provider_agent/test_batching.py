"""The provider's step batcher: concurrent decode steps on the same blocks run as one forward,
a lone session never waits for the gathering window, other blocks batch apart, and batching
can be switched off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import torch

from hivemart_core.models import create_model
from hivemart_core.models.backend import LoraWeights, SpanBackend, SpanKVCache
from hivemart_core.models.lora import LoraSpec, block_numel
from provider_agent.server.batching import StepBatcher

HIDDEN = 64
# Longer than any test could wait: a step that completes did not wait for the window.
FOREVER = 3600.0


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> SpanBackend:
    path = create_model(
        tmp_path_factory.mktemp("batching") / "m", arch="llama", hidden=HIDDEN, layers=3, seed=0, heads=4, kv_heads=2
    )
    return SpanBackend(path, 0, 3)


async def _inline(fn: Callable[[], Any], tokens: int) -> Any:
    return fn()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    # Every wait below is bounded: a batcher that waits for a window it should not wait for fails, not hangs.
    return asyncio.run(asyncio.wait_for(coro, 60))


def _session(backend: SpanBackend, length: int, seed: int, start: int = 0) -> tuple[SpanKVCache, torch.Tensor]:
    hidden = torch.randn(1, length + 4, HIDDEN, generator=torch.Generator().manual_seed(seed))
    cache = backend.new_cache(start=start, end=3, batch_size=1, max_length=32)
    if length:
        backend.inference_step(cache, hidden[:, :length], 0, start, 3)
    return cache, hidden


def _warm(
    batcher: StepBatcher, names: list[str], span: tuple[int, int] = (0, 3), adapter_id: str | None = None
) -> None:
    """Mark sessions as recently active (as their earlier steps would)."""
    import time

    for name in names:
        batcher._last_step[name] = ((*span, adapter_id), time.monotonic())  # noqa: SLF001


def test_concurrent_decode_steps_run_as_one_forward_with_each_sessions_result(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    lengths = [2, 5, 3, 8]
    sessions = [_session(backend, n, seed) for seed, n in enumerate(lengths)]
    reference = [_session(backend, n, seed) for seed, n in enumerate(lengths)]
    names = [f"s{i}" for i in range(4)]
    _warm(batcher, names)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(
            *[
                batcher.step(backend, name, cache, hidden[:, n : n + 1], n, (0, 3))
                for name, (cache, hidden), n in zip(names, sessions, lengths, strict=True)
            ]
        )

    outputs = _run(main())
    # All four arrived before the window ended (it never ends here): one forward of four.
    assert batcher.stats.to_dict()["sizes"] == {"4": 1}
    assert (batcher.stats.steps, batcher.stats.batches) == (4, 1)
    for output, (cache, hidden), n in zip(outputs, reference, lengths, strict=True):
        torch.testing.assert_close(
            output, backend.inference_step(cache, hidden[:, n : n + 1], n, 0, 3), atol=1e-5, rtol=0
        )


def test_a_lone_session_is_never_held_for_the_window_and_is_bit_exact(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    (cache, hidden), (ref_cache, _) = _session(backend, 4, 0), _session(backend, 4, 0)

    async def main() -> list[torch.Tensor]:
        return [await batcher.step(backend, "alone", cache, hidden[:, n : n + 1], n, (0, 3)) for n in (4, 5, 6)]

    outputs = _run(main())
    for output, n in zip(outputs, (4, 5, 6), strict=True):
        assert torch.equal(output, backend.inference_step(ref_cache, hidden[:, n : n + 1], n, 0, 3))
    assert batcher.stats.to_dict()["sizes"] == {"1": 3}


def test_a_closed_session_is_not_waited_for(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    _warm(batcher, ["gone"])
    batcher.forget("gone")
    cache, hidden = _session(backend, 3, 1)
    _run(batcher.step(backend, "here", cache, hidden[:, 3:4], 3, (0, 3)))
    assert batcher.stats.batches == 1


def test_steps_on_other_blocks_batch_apart_and_the_window_runs_stragglers(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=0.001)
    # Three sessions active on 0:3 and one on 1:3; only two of the 0:3 ones step now.
    _warm(batcher, ["a", "b", "c"])
    _warm(batcher, ["d"], (1, 3))
    a, b = _session(backend, 2, 0), _session(backend, 3, 1)
    d = _session(backend, 4, 2, start=1)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(
            batcher.step(backend, "a", a[0], a[1][:, 2:3], 2, (0, 3)),
            batcher.step(backend, "d", d[0], d[1][:, 4:5], 4, (1, 3)),
            batcher.step(backend, "b", b[0], b[1][:, 3:4], 3, (0, 3)),
        )

    outputs = _run(main())
    # "d" alone on its blocks went at once; "a" and "b" waited the window for "c", then went together.
    assert batcher.stats.to_dict()["sizes"] == {"1": 1, "2": 1}
    assert [o.shape for o in outputs] == [torch.Size([1, 1, HIDDEN])] * 3
    reference = _session(backend, 4, 2, start=1)
    assert torch.equal(outputs[1], backend.inference_step(reference[0], reference[1][:, 4:5], 4, 1, 3))


def _lora(backend: SpanBackend, seed: int) -> LoraWeights:
    """A random adapter (B non-zero, so that it changes outputs) for blocks 0:3."""
    spec = LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(3, block_numel(spec, backend.lora_shapes), generator=generator) * 0.2
    return LoraWeights(spec, weights, 0, source=weights)


def test_sessions_batch_only_with_sessions_of_the_same_adapter(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    lora = _lora(backend, 7)
    # "p", "q" apply the adapter, "x", "y" none: two forwards of two, each exact for its rows.
    _warm(batcher, ["p", "q"], adapter_id="adapter-one")
    _warm(batcher, ["x", "y"])
    plan = [("p", 2, lora), ("x", 5, None), ("q", 3, lora), ("y", 4, None)]
    sessions = [_session(backend, n, seed) for seed, (_, n, _) in enumerate(plan)]
    reference = [_session(backend, n, seed) for seed, (_, n, _) in enumerate(plan)]

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(
            *[
                batcher.step(
                    backend, name, cache, hidden[:, n : n + 1], n, (0, 3), lora, None if lora is None else "adapter-one"
                )
                for (name, n, lora), (cache, hidden) in zip(plan, sessions, strict=True)
            ]
        )

    outputs = _run(main())
    assert batcher.stats.to_dict()["sizes"] == {"2": 2}
    for output, (_, n, weights), (cache, hidden) in zip(outputs, plan, reference, strict=True):
        expected = backend.inference_step(cache, hidden[:, n : n + 1], n, 0, 3, weights)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    # The adapter matters: without it the same step computes something else.
    cache, hidden = _session(backend, 2, 0)
    assert not torch.allclose(outputs[0], backend.inference_step(cache, hidden[:, 2:3], 2, 0, 3), atol=1e-3)


def test_at_most_max_sessions_steps_share_a_forward(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER, max_sessions=2)
    names = ["a", "b", "c", "d"]
    _warm(batcher, names)
    sessions = [_session(backend, 2, seed) for seed in range(4)]

    async def main() -> None:
        await asyncio.gather(
            *[batcher.step(backend, n, c, h[:, 2:3], 2, (0, 3)) for n, (c, h) in zip(names, sessions, strict=True)]
        )

    _run(main())
    assert batcher.stats.to_dict()["sizes"] == {"2": 2}


def test_with_batching_off_every_step_runs_alone(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, enabled=False, window_s=FOREVER)
    sessions = [_session(backend, 2, seed) for seed in range(3)]
    reference = [_session(backend, 2, seed) for seed in range(3)]

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(
            *[batcher.step(backend, f"s{i}", c, h[:, 2:3], 2, (0, 3)) for i, (c, h) in enumerate(sessions)]
        )

    outputs = _run(main())
    assert (batcher.stats.batches, batcher.stats.unbatched) == (0, 3)
    for output, (cache, hidden) in zip(outputs, reference, strict=True):
        assert torch.equal(output, backend.inference_step(cache, hidden[:, 2:3], 2, 0, 3))


def test_prefill_chunks_take_the_unbatched_path(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    _warm(batcher, ["other"])
    cache, hidden = _session(backend, 0, 0)
    _run(batcher.step(backend, "s", cache, hidden[:, :4], 0, (0, 3)))
    assert (batcher.stats.batches, batcher.stats.unbatched, cache.length) == (0, 1, 4)


def test_training_yields_to_queued_inference_steps(backend: SpanBackend) -> None:
    batcher = StepBatcher(_inline, window_s=FOREVER)
    _warm(batcher, ["a", "b"])
    cache, hidden = _session(backend, 2, 0)
    seen: list[bool] = []

    async def main() -> None:
        step = asyncio.ensure_future(batcher.step(backend, "a", cache, hidden[:, 2:3], 2, (0, 3)))
        await asyncio.sleep(0)  # queued, waiting for "b"
        seen.append(batcher._idle.is_set())  # noqa: SLF001  (what training threads wait on)
        other, other_hidden = _session(backend, 2, 1)
        await batcher.step(backend, "b", other, other_hidden[:, 2:3], 2, (0, 3))
        await step
        seen.append(batcher._idle.is_set())  # noqa: SLF001

    _run(main())
    assert seen == [False, True]
    # A forward without a cache (training) calls the hook before each of its blocks; inference never does.
    calls: list[int] = []
    backend.between_layers = lambda: calls.append(1)
    try:
        backend.forward(torch.zeros(1, 3, HIDDEN), 0, 3)
        assert len(calls) == 3
        backend.inference_step(
            backend.new_cache(start=0, end=3, batch_size=1, max_length=4), torch.zeros(1, 1, HIDDEN), 0, 0, 3
        )
        assert len(calls) == 3
    finally:
        del backend.between_layers
