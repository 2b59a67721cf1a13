"""``hivemart bench train``: seconds per optimizer step, locally and through the swarm.

Creates a model, then times the same fine-tuning step (batch ``batch_size x seq_len``,
AdamW on the trainable parts) with local ``transformers`` (+ PEFT for LoRA, hooks for deep
prompts) and through providers on loopback with :class:`client_sdk.finetune.FineTuner`.
Both start from the same weights; ``grad_match`` says whether the first step's gradients
agree (max abs difference within ``1e-3`` of the largest local gradient, plus ``1e-6``).
Medians over ``repeats`` steps of each after ``warmup`` steps, local and swarm steps taken in
turns (so that other load on the machine hits both alike).

Under load (``hivemart bench train --jobs 2,4``, :func:`run_train_load_bench`): for each count,
that many LoRA jobs at once, each in its own process with its own p2p daemon (as separate
clients would be), while an inference client in this process generates the same tokens over
and over: aggregate optimizer steps/s, and the client's median ms/token over the generations
that began while the jobs trained, beside its ms/token alone. The client's tokens are checked
equal to those it generates alone, and every job's losses finite.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from client_sdk.finetune.peft_export import peft_state_dict
from client_sdk.finetune.trainer import FineTuner, TrainConfig
from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart.bench.inference import PROMPT, _in_workdir, split_blocks
from hivemart_core.models import create_model, load_tokenizer
from hivemart_core.models.lora import module_path
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["run_train_bench", "run_train_load_bench", "measure_train_load", "TrainLoad"]


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class _LocalStep:
    """The fine-tuning step of :class:`FineTuner`, on a local ``transformers`` model."""

    def __init__(self, model_path: Path, tuner: FineTuner, lr: float) -> None:
        from transformers import AutoModelForCausalLM

        self.tuner = tuner
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.prefix = 0
        if tuner.lora is not None:
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

            spec = tuner.lora.spec
            self.model = get_peft_model(
                self.model,
                LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0),
            )
            set_peft_model_state_dict(self.model, peft_state_dict(spec, tuner.lora.shapes, tuner.lora.weights))
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            self.model.requires_grad_(False)
            self.prompts = torch.nn.Parameter(tuner.prompts.detach().clone())
            self.prefix = self.prompts.shape[0]
            self.params = [self.prompts]
            if tuner.deep_prompts is not None:
                self.deep = torch.nn.Parameter(tuner.deep_prompts.detach().clone())
                self.params.append(self.deep)
                self._add_deep_prompt_hooks()
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def _add_deep_prompt_hooks(self) -> None:
        def hook(index: int) -> Callable:
            def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden = args[0]
                prompts = self.deep[index]
                hidden = torch.cat([hidden[:, : self.prefix] + prompts, hidden[:, self.prefix :]], dim=1)
                return (hidden, *args[1:]), kwargs

            return pre

        for i, layer in enumerate(self.model.model.layers):
            layer.register_forward_pre_hook(hook(i), with_kwargs=True)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.prefix == 0:
            return _lm_loss(self.model(input_ids=ids).logits, ids)
        embeds = self.model.get_input_embeddings()(ids)
        embeds = torch.cat([self.prompts[None].expand(ids.shape[0], -1, -1), embeds], dim=1)
        return _lm_loss(self.model(inputs_embeds=embeds).logits[:, self.prefix :], ids)

    def step(self, ids: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(ids).backward()
        self.optimizer.step()

    def grads(self) -> torch.Tensor:
        """The gradients of the trainable parts in the layout of ``FineTuner.parameters()``."""
        if self.tuner.lora is None:
            return torch.cat([p.grad.flatten() for p in self.params])
        lora, modules = self.tuner.lora, dict(self.model.named_modules())
        parts = []
        for block in range(lora.num_blocks):
            for target in lora.spec.targets:
                layer = modules[f"base_model.model.model.layers.{block}.{module_path(target)}"]
                parts += [layer.lora_A["default"].weight.grad.flatten(), layer.lora_B["default"].weight.grad.flatten()]
        return torch.cat(parts)


def _interleaved_medians(steps: list[Callable[[], None]], warmup: int, repeats: int) -> list[float]:
    """Median seconds of each step, timing them in turns so that a change in the machine's
    load (other processes) hits all of them alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times, strict=False):
            started = time.perf_counter()
            step()
            record.append(time.perf_counter() - started)
    return [statistics.median(record) for record in times]


@_in_workdir
def run_train_bench(
    *,
    mode: str = "lora",
    hidden: int = 512,
    layers: int = 8,
    providers: int = 2,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    chunk_tokens: int = 512,
    provider_threads: int = 1,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    ids = torch.randint(3, 2048, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        mode=mode,
        steps=1,
        lr=1e-4,
        batch_size=batch_size,
        seq_len=seq_len,
        prefix_len=16,
        rank=8,
        alpha=16.0,
        targets=("q_proj", "v_proj"),
    )
    spans = split_blocks(layers, providers)
    progress(f"starting {providers} providers on loopback: {spans}")
    with LocalSwarm(workdir=workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, spans, torch_threads=provider_threads)
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
            model.remote.max_chunk_tokens = chunk_tokens
            tuner = FineTuner(model, config)
            local = _LocalStep(model_path, tuner, config.lr)

            progress("comparing the first step's gradients")
            local.optimizer.zero_grad(set_to_none=True)
            local.loss(ids).backward()
            expected = local.grads()
            tuner.optimizer.zero_grad(set_to_none=True)
            tuner.loss(ids).backward()
            actual = torch.cat([p.grad.flatten() for p in tuner.parameters()])
            error = float((actual - expected).abs().max())
            scale = float(expected.abs().max())
            grad_match = scale > 0 and error <= 1e-3 * scale + 1e-6  # all-zero gradients prove nothing

            progress(f"timing {repeats} local and {repeats} swarm steps, in turns")
            local_s, swarm_s = _interleaved_medians(
                [lambda: local.step(ids), lambda: tuner.train_step(ids)], warmup, repeats
            )
            tuner.close()
    return {
        "hidden": hidden,
        "layers": layers,
        "providers": providers,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "chunk_tokens": chunk_tokens,
        "max_grad_error": error,
        "mode": mode,
        "local_s_per_step": round(local_s, 6),
        "swarm_s_per_step": round(swarm_s, 6),
        "ratio": round(swarm_s / local_s, 3),
        "grad_match": grad_match,
    }


# --- training under load: concurrent LoRA jobs and an inference client --------------------------


@dataclass(frozen=True)
class TrainLoad:
    """What each concurrent fine-tuning job of :func:`measure_train_load` does."""

    batch_size: int = 8
    seq_len: int = 128
    steps: int = 3  # timed optimizer steps per job (after one warm-up step)
    chunk_tokens: int = 512
    rank: int = 8


def _train_job(
    model_path: str,
    initial_peers: list[str],
    load: TrainLoad,
    seed: int,
    start: Any,  # multiprocessing Event: every job starts its timed steps at once
    results: Any,  # multiprocessing Queue: ("ready", seed) then ("done", seed, report)
) -> None:
    """One LoRA job in its own process (a client of its own, with its own p2p daemon): a
    warm-up step, then ``load.steps`` timed steps once ``start`` is set."""
    torch.set_num_threads(1)  # the client side of a job is small; leave the cores to the providers
    ids = torch.randint(3, 2048, (load.batch_size, load.seq_len), generator=torch.Generator().manual_seed(seed))
    config = TrainConfig(
        mode="lora", steps=1, lr=1e-4, batch_size=load.batch_size, seq_len=load.seq_len, rank=load.rank, seed=seed
    )
    with SwarmRuntime(initial_peers) as runtime:
        model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
        model.remote.max_chunk_tokens = load.chunk_tokens
        tuner = FineTuner(model, config)
        try:
            tuner.train_step(ids)  # warm-up: connections, the adapter's upload
            results.put(("ready", seed))
            start.wait()
            started = time.monotonic()
            losses = [tuner.train_step(ids) for _ in range(load.steps)]
            ended = time.monotonic()
        finally:
            tuner.close()
    results.put(("done", seed, {"started": started, "ended": ended, "steps": load.steps, "losses": losses}))


class _Inference:
    """The concurrent inference client: greedy generation of the same tokens, timed."""

    def __init__(self, model_path: Path, runtime: SwarmRuntime, new_tokens: int) -> None:
        self.model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
        self.prompt = load_tokenizer(model_path)(PROMPT, return_tensors="pt").input_ids
        self.new_tokens = new_tokens

    def run(self) -> tuple[float, float, torch.Tensor]:
        """(start time, ms per token, tokens) of one generation."""
        started = time.monotonic()
        tokens = self.model.generate(self.prompt, max_new_tokens=self.new_tokens)
        return started, (time.monotonic() - started) * 1000 / self.new_tokens, tokens


def _run_jobs(
    model_path: Path,
    initial_peers: list[str],
    load: TrainLoad,
    jobs: int,
    inference: _Inference,
    expected: torch.Tensor,
    startup_timeout: float,
) -> dict[str, Any]:
    """``jobs`` LoRA jobs at once, each in its own process, with the inference client generating
    all the while; aggregate steps/s and the client's ms/token over the generations that began
    while training ran."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")  # fork would copy this process's p2p daemon and threads
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(
            target=_train_job, args=(str(model_path), initial_peers, load, seed, start, results), daemon=True
        )
        for seed in range(1, jobs + 1)
    ]
    for process in processes:
        process.start()
    try:
        ready, deadline = 0, time.monotonic() + startup_timeout
        while ready < jobs:
            try:
                ready += results.get(timeout=1.0)[0] == "ready"
            except queue.Empty:
                if not all(p.is_alive() for p in processes) or time.monotonic() > deadline:
                    raise RuntimeError(f"{jobs - ready} of {jobs} training jobs did not start; see stderr") from None
        start.set()
        reports: list[dict[str, Any]] = []
        runs: list[tuple[float, float, torch.Tensor]] = []
        while len(reports) < jobs:
            runs.append(inference.run())
            while True:
                try:
                    reports.append(results.get_nowait()[2])
                except queue.Empty:
                    break
            if len(reports) < jobs and not any(p.is_alive() for p in processes) and results.empty():
                raise RuntimeError("a training job died; its output is on stderr")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    began, ended = min(r["started"] for r in reports), max(r["ended"] for r in reports)
    during = [run for run in runs if run[0] < ended]  # the first began right after the jobs did
    steps = sum(r["steps"] for r in reports)
    return {
        "jobs": jobs,
        "steps": steps,
        "seconds": round(ended - began, 3),
        "steps_per_s": round(steps / (ended - began), 4),
        "inference_ms_per_token": round(statistics.median(ms for _, ms, _ in during), 3),
        "inference_runs": len(during),
        "inference_exact": all(torch.equal(tokens, expected) for _, _, tokens in runs),
        "jobs_ok": all(len(r["losses"]) == r["steps"] and all(map(math.isfinite, r["losses"])) for r in reports),
    }


def measure_train_load(
    model_path: Path,
    initial_peers: list[str],
    *,
    jobs: Sequence[int] = (2, 4),
    load: TrainLoad = TrainLoad(),
    new_tokens: int = 32,
    repeats: int = 3,
    startup_timeout: float = 300.0,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Against a running swarm serving ``model_path``: the inference client's ms/token alone
    (median of ``repeats`` generations), then for each count in ``jobs``, that many concurrent
    LoRA jobs with the client generating meanwhile. Returns one report per count and a summary."""
    with SwarmRuntime(initial_peers) as runtime:
        inference = _Inference(model_path, runtime, new_tokens)
        inference.run()  # warm-up
        progress(f"inference alone: {repeats} generations of {new_tokens} tokens")
        alone = [inference.run() for _ in range(repeats)]
        expected = alone[0][2]
        idle_ms = statistics.median(ms for _, ms, _ in alone)
        reports = []
        for count in jobs:
            progress(f"{count} LoRA jobs at once ({load.steps} steps each) while the client generates")
            reports.append(_run_jobs(model_path, initial_peers, load, count, inference, expected, startup_timeout))
            progress(f"{count} jobs: {json.dumps(reports[-1])}")
    summary = {
        "jobs": [r["jobs"] for r in reports],
        "steps_per_s": [r["steps_per_s"] for r in reports],
        "inference_ms_per_token_idle": round(idle_ms, 3),
        "inference_ms_per_token": [r["inference_ms_per_token"] for r in reports],
        "inference_slowdown": [round(r["inference_ms_per_token"] / idle_ms, 3) for r in reports],
        "inference_exact": all(torch.equal(t, expected) for _, _, t in alone)
        and all(r["inference_exact"] for r in reports),
        "jobs_ok": all(r["jobs_ok"] for r in reports),
    }
    return reports, summary


@_in_workdir
def run_train_load_bench(
    *,
    jobs: Sequence[int] = (2, 4),
    hidden: int = 512,
    layers: int = 8,
    providers: int = 2,
    load: TrainLoad = TrainLoad(),
    new_tokens: int = 32,
    repeats: int = 3,
    provider_threads: int = 1,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """:func:`measure_train_load` on a new model and swarm; the summary carries the sizes and
    ``per_count`` (the report of each job count)."""
    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    spans = split_blocks(layers, providers)
    progress(f"starting {providers} providers on loopback: {spans}")
    with LocalSwarm(workdir=workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, spans, torch_threads=provider_threads)
        reports, summary = measure_train_load(
            model_path,
            swarm.initial_peers,
            jobs=jobs,
            load=load,
            new_tokens=new_tokens,
            repeats=repeats,
            progress=progress,
        )
    return {
        "hidden": hidden,
        "layers": layers,
        "providers": providers,
        "mode": "lora",
        "batch_size": load.batch_size,
        "seq_len": load.seq_len,
        "steps_per_job": load.steps,
        "new_tokens": new_tokens,
        **summary,
        "per_count": reports,
    }
