"""``hivemart bench inference``: local generation versus the swarm's.

Creates a model, starts a bootstrap node and providers on loopback, and times greedy
generation of the same tokens through the swarm, in push mode (the default) and in
round-trip mode, against two local baselines in this process:

- ``local``: ``transformers``' ``generate`` (its per-step overhead is large, and varies
  between versions, so a ratio against it flatters the swarm);
- ``local_fast``: every block in one :class:`~hivemart_core.models.backend.SpanBackend`, the
  step code providers run, with its KV cache, and the client's embeddings, norm and head as
  :class:`client_sdk.swarm.model.DistributedModelForCausalLM` uses them; no network, nothing
  signed or hashed. It is the limit the swarm is compared against (``ratio_fast``).

All are timed in turn after a warm-up of each, round after round, so that the machine's
drifting load hits them alike; medians over ``repeats`` rounds.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import ClientParts, create_model, load_client_parts, load_model_info, load_tokenizer
from hivemart_core.models.backend import SpanBackend
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["run_inference_bench", "split_blocks", "FastLocalGenerator"]

PROMPT = "A marketplace for compute lets strangers trade GPU time safely"


def split_blocks(layers: int, providers: int) -> list[tuple[int, int]]:
    """``providers`` contiguous spans covering ``layers`` blocks as evenly as possible."""
    if not 1 <= providers <= layers:
        raise ValueError(f"need between 1 and {layers} providers for {layers} blocks, got {providers}")
    bounds = [round(i * layers / providers) for i in range(providers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


class FastLocalGenerator:
    """Greedy generation with every block in one process, through the providers' own step
    code: embeddings -> ``SpanBackend.inference_step`` over all blocks -> final norm and head
    -> argmax, one token per step after the prompt. The same computation, in the same order,
    as a swarm session, so the tokens are the swarm's bit for bit."""

    def __init__(self, model_path: Path, *, dtype: torch.dtype, device: str) -> None:
        self.parts: ClientParts = load_client_parts(model_path, dtype=dtype, device=device)
        blocks = load_model_info(model_path).num_blocks
        self.backend = SpanBackend(model_path, 0, blocks, dtype=dtype, device=device)
        self.threads = torch.get_num_threads()  # torch threads while generating (see tune_threads)

    def tune_threads(self, prompt: torch.Tensor, new_tokens: int, sync: Callable[[], None] = lambda: None) -> int:
        """Use the fastest torch thread count, 1 up to the process's: on a small CPU shared
        with other processes, threads that spin between operations can cost more than they
        save, and the baseline must not be slowed by a poor choice."""
        timings = {}
        for threads in range(1, torch.get_num_threads() + 1):
            self.threads = threads
            self.generate(prompt, new_tokens)  # warm-up at this count
            timings[threads] = min(
                _ms_per_token(lambda: self.generate(prompt, new_tokens), new_tokens, sync)[0] for _ in range(2)
            )
        self.threads = min(timings, key=lambda t: timings[t])
        return self.threads

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The prompt followed by ``new_tokens`` greedy tokens, like ``transformers``."""
        process_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._generate(prompt, new_tokens)
        finally:
            torch.set_num_threads(process_threads)

    @torch.inference_mode()
    def _generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        backend, parts = self.backend, self.parts
        end = backend.end
        batch, length = prompt.shape
        cache = backend.new_cache(start=0, end=end, batch_size=batch, max_length=length + new_tokens)
        # Tokens stay on the device until the end: no synchronisation per step.
        tokens = torch.empty(batch, length + new_tokens, dtype=prompt.dtype, device=backend.device)
        tokens[:, :length] = prompt
        feed, position = tokens[:, :length], 0
        for i in range(length, length + new_tokens):
            hidden = backend.inference_step(cache, parts.embed(feed), position, 0, end)
            position += feed.shape[1]
            feed = parts.logits(hidden[:, -1:]).argmax(dim=-1)
            tokens[:, i] = feed[:, 0]
        return tokens.cpu()


def _ms_per_token(
    fn: Callable[[], torch.Tensor], new_tokens: int, sync: Callable[[], None]
) -> tuple[float, torch.Tensor]:
    sync()
    started = time.perf_counter()
    tokens = fn()
    sync()
    return (time.perf_counter() - started) * 1000 / new_tokens, tokens


def _in_workdir(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run a benchmark in ``workdir``, or in a temporary directory removed afterwards."""

    @functools.wraps(fn)
    def run(*, workdir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
        if workdir is not None:
            return fn(workdir=Path(workdir), **kwargs)
        with tempfile.TemporaryDirectory(prefix="hivemart-bench-") as tmp:
            return fn(workdir=Path(tmp), **kwargs)

    return run


@_in_workdir
def run_inference_bench(
    *,
    hidden: int = 512,
    layers: int = 8,
    providers: int = 2,
    new_tokens: int = 64,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str = "float32",
    provider_threads: int = 0,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    torch_dtype = getattr(torch, dtype)
    prompt = load_tokenizer(model_path)(PROMPT, return_tensors="pt").input_ids
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)

    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    local_prompt = prompt.to(device)

    def local_generate() -> torch.Tensor:
        with torch.inference_mode():
            return local.generate(
                local_prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            ).cpu()

    fast = FastLocalGenerator(model_path, dtype=torch_dtype, device=device)
    if not device.startswith("cuda"):
        progress("choosing the fast baseline's torch thread count")
        fast.tune_threads(prompt, new_tokens)

    spans = split_blocks(layers, providers)
    progress(f"starting {providers} providers on loopback: {spans}")
    with LocalSwarm(workdir=workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        agents = swarm.start_agents(
            model_path, spans, torch_threads=provider_threads, extra_args=["--device", device, "--dtype", dtype]
        )
        threads = sorted({agent.ready.get("torch_threads") for agent in agents})
        with SwarmRuntime(swarm.initial_peers) as runtime:
            runs: dict[str, Callable[[], torch.Tensor]] = {
                "local": local_generate,
                "local_fast": functools.partial(fast.generate, prompt, new_tokens),
            }
            for mode, push in (("push", True), ("round_trip", False)):
                model = DistributedModelForCausalLM.from_pretrained(
                    model_path, runtime=runtime, push=push, dtype=torch_dtype, device=device
                )
                runs[mode] = functools.partial(
                    model.generate,
                    prompt,
                    max_new_tokens=new_tokens,
                    eos_token_id=None,  # every run makes all tokens
                )
            for run in runs.values():
                run()  # warm-up: caches, connections
            # Interleaved, so that the machine's drifting load hits local and swarm runs alike.
            times: dict[str, list[float]] = {name: [] for name in runs}
            tokens: dict[str, torch.Tensor] = {}
            for repeat in range(repeats):
                progress(f"timing round {repeat + 1}/{repeats}: {', '.join(runs)}")
                for name, run in runs.items():
                    local_run = name.startswith("local")
                    ms, tokens[name] = _ms_per_token(run, new_tokens, sync if local_run else lambda: None)
                    times[name].append(ms)
    local_ms = statistics.median(times["local"])
    local_tokens = tokens["local"]
    results = {name: statistics.median(values) for name, values in times.items()}
    swarm_tokens = {name: tokens[name] for name in ("push", "round_trip")}
    swarm_ms = results["push"]
    exact = all(torch.equal(t, local_tokens) for t in swarm_tokens.values())
    exact_fast = all(torch.equal(t, tokens["local_fast"]) for t in swarm_tokens.values())
    fast_ms = results["local_fast"]
    return {
        "hidden": hidden,
        "layers": layers,
        "providers": providers,
        "local_ms_per_token": round(local_ms, 3),
        "swarm_ms_per_token": round(swarm_ms, 3),
        "ratio": round(swarm_ms / local_ms, 3),
        "overhead_ms_per_hop": round((swarm_ms - local_ms) / providers, 3),
        "exact_match": exact,
        "round_trip_ms_per_token": round(results["round_trip"], 3),
        "local_fast_ms_per_token": round(fast_ms, 3),
        "ratio_fast": round(swarm_ms / fast_ms, 3),
        "overhead_fast_ms_per_hop": round((swarm_ms - fast_ms) / providers, 3),
        "exact_match_fast": exact_fast,
        "local_fast_threads": fast.threads,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": device,
        "dtype": dtype,
        "provider_threads": threads[0] if len(threads) == 1 else threads,
    }


@_in_workdir
def run_failover_bench(
    *,
    hidden: int = 512,
    layers: int = 8,
    new_tokens: int = 100,
    kill_at: int = 20,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate through a chain whose second span has a backup; SIGKILL the provider serving
    that span after token ``kill_at`` and measure the longest gap between tokens."""
    import signal

    from transformers import AutoModelForCausalLM

    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    prompt = load_tokenizer(model_path)(PROMPT, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    del local

    half = layers // 2
    spans = [(0, half), (half, layers), (half, layers)]
    progress(f"starting providers {spans} (the last is the backup)")
    with LocalSwarm(workdir=workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, spans)
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
            model.generate(prompt, max_new_tokens=4)  # warm-up: connections and caches
            stamps: list[float] = []
            with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:

                def on_token(_: torch.Tensor) -> None:
                    stamps.append(time.perf_counter())
                    if len(stamps) == kill_at:
                        serving = next(h for h in session.chain.route if h.start == half)
                        victim = next(a for a in swarm.agents if a.peer_id == serving.peer_id)
                        progress(f"token {kill_at}: SIGKILL provider {victim.peer_id[-8:]} (blocks {half}:{layers})")
                        victim.process.send_signal(signal.SIGKILL)

                started = time.perf_counter()
                tokens = model.generate(
                    prompt, max_new_tokens=new_tokens, session=session, on_token=on_token, eos_token_id=None
                )
                failovers = list(session.chain.failovers)
    gaps = [(b - a) * 1000 for a, b in zip([started] + stamps[:-1], stamps, strict=False)]
    return {
        "tokens": len(stamps),
        "killed_at": kill_at,
        "max_gap_ms": round(max(gaps[1:]), 1),
        "median_ms_per_token": round(statistics.median(gaps[1:]), 3),
        "exact_match": bool(torch.equal(tokens, expected)),
        "failovers": len(failovers),
        "hidden": hidden,
        "layers": layers,
    }
