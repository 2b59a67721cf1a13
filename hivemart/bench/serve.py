"""``hivemart bench serve``: streaming through the OpenAI-compatible gateway versus the SDK.

Creates a model, starts a bootstrap node and providers on loopback, and the gateway
(``hivemart.serve``) under uvicorn on loopback. For each concurrency (1 and 8 streams by
default) it times the same greedy generations through the SDK (``model.generate`` with
``on_token``) and through the gateway (OpenAI's client, ``stream=True``): time to first token
and tokens per second, per stream and in total. SDK and gateway rounds alternate, so that the
machine's drifting load hits both alike; medians over ``repeats`` rounds.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from client_sdk.swarm.local import LocalSwarm
from hivemart.bench.inference import split_blocks
from hivemart_core.models import create_model

__all__ = ["run_serve_bench"]

PROMPT = "A marketplace for compute lets strangers trade GPU time safely"
KEY = "bench-gateway-key-0123456789"


@contextmanager
def _gateway(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _concurrently(run: Callable[[int], tuple[float, int]], streams: int) -> dict[str, float]:
    """``streams`` calls of ``run(i) -> (seconds to the first token, tokens)`` at once."""
    results: list[tuple[float, int, float]] = [(0.0, 0, 0.0)] * streams
    errors: list[BaseException] = []
    started = time.perf_counter()

    def one(i: int) -> None:
        try:
            ttft, tokens = run(i)
            results[i] = (ttft, tokens, time.perf_counter() - started)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - started
    return {
        "ttft_ms": statistics.median(r[0] for r in results) * 1000,
        "stream_tokens_per_s": statistics.median(r[1] / r[2] for r in results),
        "total_tokens_per_s": sum(r[1] for r in results) / wall,
    }


def run_serve_bench(*, workdir: Path | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """The benchmark in ``workdir``, or in a temporary directory removed afterwards."""
    if workdir is not None:
        return _run(workdir=Path(workdir), **kwargs)
    with tempfile.TemporaryDirectory(prefix="hivemart-bench-") as tmp:
        return _run(workdir=Path(tmp), **kwargs)


def _run(
    *,
    hidden: int = 256,
    layers: int = 4,
    providers: int = 2,
    new_tokens: int = 32,
    concurrency: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    workdir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    import openai

    from hivemart.serve.app import create_app
    from hivemart.serve.engine import Served

    progress(f"creating a llama model: hidden {hidden}, {layers} layers")
    model_path = create_model(
        workdir / f"bench-llama-{hidden}x{layers}", arch="llama", hidden=hidden, layers=layers, seed=0
    )
    spans = split_blocks(layers, providers)
    progress(f"starting {providers} providers on loopback: {spans}")
    with LocalSwarm(workdir=workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, spans)
        served = Served.load(model_path, initial_peers=list(swarm.initial_peers), name="bench")
        prompts = [f"{PROMPT} ({i})" for i in range(max(concurrency))]
        ids = [served.tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        eos = served.tokenizer.eos_token_id
        try:
            with _gateway(create_app(served, api_key=KEY, max_concurrent=max(concurrency), close_served=False)) as url:
                client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)

                def sdk(i: int) -> tuple[float, int]:
                    started, first, count = time.perf_counter(), [0.0], [0]

                    def on_token(_: torch.Tensor) -> None:
                        count[0] += 1
                        if count[0] == 1:
                            first[0] = time.perf_counter() - started

                    served.model.generate(ids[i], max_new_tokens=new_tokens, eos_token_id=eos, on_token=on_token)
                    return first[0], count[0]

                def gateway(i: int) -> tuple[float, int]:
                    started, first, tokens = time.perf_counter(), None, 0
                    stream = client.completions.create(
                        model="bench",
                        prompt=prompts[i],
                        max_tokens=new_tokens,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    for chunk in stream:
                        if first is None:
                            first = time.perf_counter() - started
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    return first or 0.0, tokens

                sdk(0), gateway(0)  # warm-up: connections, caches
                samples: dict[tuple[str, int], list[dict[str, float]]] = {}
                for repeat in range(repeats):
                    for streams in concurrency:
                        progress(f"round {repeat + 1}/{repeats}: {streams} stream(s), SDK then gateway")
                        for name, run in (("sdk", sdk), ("gateway", gateway)):
                            samples.setdefault((name, streams), []).append(_concurrently(run, streams))
        finally:
            served.model.close()
    lines = []
    for streams in concurrency:
        line: dict[str, Any] = {"bench": "serve", "streams": streams}
        for name in ("sdk", "gateway"):
            for figure in ("ttft_ms", "stream_tokens_per_s", "total_tokens_per_s"):
                line[f"{name}_{figure}"] = round(statistics.median(s[figure] for s in samples[(name, streams)]), 2)
        line.update(
            hidden=hidden, layers=layers, providers=providers, new_tokens=new_tokens, repeats=repeats, device="cpu"
        )
        lines.append(line)
    return lines
