"""``hivemart bench load``: many clients generating at once through the same providers.

Creates a model and starts a bootstrap node and providers on loopback, once with batching on
and once with ``--no-batching``. For each client count, that many sessions (prompts of
different lengths, so that the sessions sit at different positions) generate greedily at once;
the benchmark reports aggregate tokens/s, the p50 and p99 of the time between one token of a
session and its next (per-token latency; the first token, which includes the prompt, is left
out), and whether every session's tokens equal local ``transformers`` generation.

The clients are coroutines on one client process's event loop (one p2p daemon for all of
them), so that client processes do not take the CPU the providers are measured on: a
client's own work per token (the embedding and the LM head) is small next to a span's.
Each session has a generous step timeout: the benchmark measures latency, it does not fail
over. The machine may be shared, so figures are noisy; compare lines of the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from client_sdk.swarm.routing import RouteHop
from client_sdk.swarm.session import ChainSession
from hivemart.bench.inference import PROMPT, _in_workdir, split_blocks
from hivemart_core.models import create_model, load_tokenizer
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["run_load_bench", "percentile"]

# Distinct prompts (of distinct lengths); client i generates after prompt i % _PROMPTS.
_PROMPTS = 8
# A step waits this long before the benchmark calls it failed (no failover here).
_STEP_TIMEOUT_S = 120.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, nearest rank."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[min(len(ordered), int(rank)) - 1]


def _prompts(model_path: Path, count: int) -> list[torch.Tensor]:
    ids = load_tokenizer(model_path)(PROMPT, return_tensors="pt").input_ids
    return [ids[:, : max(1, ids.shape[1] - i)] for i in range(count)]


def _local_references(
    model_path: Path, prompts: list[torch.Tensor], new_tokens: int, dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        return [
            local.generate(
                p.to(device), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            ).cpu()
            for p in prompts
        ]


async def _generate(
    model: DistributedModelForCausalLM, chain: ChainSession, prompt: torch.Tensor, new_tokens: int, stamps: list[float]
) -> torch.Tensor:
    """Greedy generation on an open chain, stamping the time each new token is known."""
    feed, tokens = prompt, [prompt]
    for _ in range(new_tokens):
        hidden = await chain.step(model.parts.embed(feed))
        with torch.inference_mode():  # no await inside: the loop's other clients never see it
            token = model.parts.logits(hidden[:, -1:])[:, -1].argmax(dim=-1).cpu()
        stamps.append(time.perf_counter())
        feed = token[:, None]
        tokens.append(feed)
    return torch.cat(tokens, dim=1)


async def _run_clients(
    model: DistributedModelForCausalLM,
    route: list[RouteHop],
    prompts: list[torch.Tensor],
    new_tokens: int,
) -> tuple[list[torch.Tensor], list[list[float]], float]:
    """Open one session per prompt, then generate on all at once; (tokens, stamps, seconds)."""
    p2p = model.runtime.p2p
    chains = [
        ChainSession(p2p, route, max_length=p.shape[1] + new_tokens, step_timeout=_STEP_TIMEOUT_S) for p in prompts
    ]
    try:
        await asyncio.gather(*(chain.open() for chain in chains))
        stamps: list[list[float]] = [[] for _ in prompts]
        started = time.perf_counter()
        tokens = await asyncio.gather(
            *(_generate(model, c, p, new_tokens, s) for c, p, s in zip(chains, prompts, stamps, strict=True))
        )
        return list(tokens), stamps, time.perf_counter() - started
    finally:
        await asyncio.gather(*(chain.close() for chain in chains), return_exceptions=True)


async def _batch_stats(runtime: SwarmRuntime, peers: list[str]) -> list[dict[str, Any]]:
    infos = [await ProviderConnection(runtime.p2p, peer).info() for peer in peers]
    return [dict(info.get("batching", {})) for info in infos]


def _measure(
    model_path: Path,
    swarm: LocalSwarm,
    counts: Sequence[int],
    prompts: list[torch.Tensor],
    new_tokens: int,
    dtype: torch.dtype,
    device: str,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Per client count: tokens/s, latencies, each session's tokens and the providers' batches."""
    peers = [agent.peer_id for agent in swarm.agents]
    results = []
    with SwarmRuntime(swarm.initial_peers) as runtime:
        model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime, dtype=dtype, device=device)
        route = model.route()
        runtime.run(_run_clients(model, route, prompts[:2], 4))  # warm-up: connections, caches
        for count in counts:
            progress(f"{count} clients x {new_tokens} tokens")
            before = runtime.run(_batch_stats(runtime, peers))
            tokens, stamps, seconds = runtime.run(
                _run_clients(model, route, [prompts[i % len(prompts)] for i in range(count)], new_tokens)
            )
            after = runtime.run(_batch_stats(runtime, peers))
            gaps = [(b - a) * 1000 for s in stamps for a, b in zip(s, s[1:], strict=False)]
            steps = sum(a.get("steps", 0) - b.get("steps", 0) for a, b in zip(after, before, strict=True))
            batches = sum(a.get("batches", 0) - b.get("batches", 0) for a, b in zip(after, before, strict=True))
            results.append(
                {
                    "tokens": tokens,
                    "tokens_per_s": count * new_tokens / seconds,
                    "p50_ms": statistics.median(gaps) if gaps else 0.0,
                    "p99_ms": percentile(gaps, 99) if gaps else 0.0,
                    "mean_batch": steps / batches if batches else 1.0,
                    "max_batch": max((a.get("max_batch", 0) for a in after), default=0),
                }
            )
            shown = {k: round(v, 2) for k, v in results[-1].items() if k != "tokens"}
            progress(f"{count} clients: {shown}")
    return results


def _swarm_results(
    model_path: Path,
    workdir: Path,
    spans: list[tuple[int, int]],
    *,
    batching: bool,
    counts: Sequence[int],
    prompts: list[torch.Tensor],
    new_tokens: int,
    device: str,
    dtype: str,
    provider_threads: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    most = str(max(counts) + 4)
    args = [
        "--device",
        device,
        "--dtype",
        dtype,
        "--max-sessions",
        most,
        "--max-sessions-per-peer",
        most,
        "--max-streams-per-peer",
        str(4 * int(most) + 16),
        "--peer-cache-mb",
        "512",
        *([] if batching else ["--no-batching"]),
    ]
    progress(f"starting {len(spans)} providers {'with' if batching else 'without'} batching: {spans}")
    with LocalSwarm(workdir=workdir) as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, spans, torch_threads=provider_threads, extra_args=args)
        return _measure(model_path, swarm, counts, prompts, new_tokens, getattr(torch, dtype), device, progress)


@_in_workdir
def run_load_bench(
    *,
    hidden: int = 512,
    layers: int = 8,
    providers: int = 2,
    clients: Sequence[int] = (1, 4, 16, 64),
    new_tokens: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    provider_threads: int = 0,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    emit: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the benchmark; ``emit`` gets one object per client count, the summary is returned."""
    assert workdir is not None  # _in_workdir provides it
    if not clients or min(clients) < 1:
        raise ValueError("clients must be one or more counts of at least 1")
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (latency is the time between tokens)")
    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    prompts = _prompts(model_path, min(_PROMPTS, max(clients)))
    progress(f"local generation of {len(prompts)} prompts (the reference)")
    expected = _local_references(model_path, prompts, new_tokens, getattr(torch, dtype), device)
    spans = split_blocks(layers, providers)
    common = dict(
        counts=clients,
        prompts=prompts,
        new_tokens=new_tokens,
        device=device,
        dtype=dtype,
        provider_threads=provider_threads,
        progress=progress,
    )
    on = _swarm_results(model_path, workdir / "swarm-batched", spans, batching=True, **common)  # type: ignore[arg-type]
    off = _swarm_results(model_path, workdir / "swarm-unbatched", spans, batching=False, **common)  # type: ignore[arg-type]
    exact_all = True
    for count, b, u in zip(clients, on, off, strict=True):
        exact = all(torch.equal(t, expected[i % len(expected)]) for run in (b, u) for i, t in enumerate(run["tokens"]))
        exact_all &= exact
        emit(
            {
                "clients": count,
                "tokens_per_s": round(b["tokens_per_s"], 1),
                "tokens_per_s_unbatched": round(u["tokens_per_s"], 1),
                "p50_ms": round(b["p50_ms"], 2),
                "p99_ms": round(b["p99_ms"], 2),
                "p50_ms_unbatched": round(u["p50_ms"], 2),
                "p99_ms_unbatched": round(u["p99_ms"], 2),
                "mean_batch": round(b["mean_batch"], 2),
                "max_batch": b["max_batch"],
                "exact_match": exact,
            }
        )
    return {
        "hidden": hidden,
        "layers": layers,
        "providers": providers,
        "clients": list(clients),
        "tokens_per_s": [round(r["tokens_per_s"], 1) for r in on],
        "tokens_per_s_unbatched": [round(r["tokens_per_s"], 1) for r in off],
        "p50_ms": [round(r["p50_ms"], 2) for r in on],
        "p99_ms": [round(r["p99_ms"], 2) for r in on],
        "exact_match": exact_all,
        "new_tokens": new_tokens,
        "device": device,
        "dtype": dtype,
        "client_concurrency": "coroutines on one client event loop",
    }
