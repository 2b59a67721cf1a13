"""The provider agent: load a span, serve it over hivemind, announce it, and stop cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import uvloop
from hivemind.dht.node import DHTNode
from hivemind.utils.logging import get_logger

from client_sdk.models import block_digest
from client_sdk.protocol.identity import Identity
from client_sdk.protocol.records import ServerRecord, ServerState
from client_sdk.swarm.dht import SignedRecordValidator, announce_span
from client_sdk.swarm.p2p import start_p2p
from provider_agent.backend import SpanBackend
from provider_agent.config import AgentConfig
from provider_agent.server import ProviderServer

logger = get_logger(__name__)

__all__ = ["run_agent", "measure_throughput", "resolve_dtype"]


def resolve_dtype(name: str, device: str) -> torch.dtype | None:
    """The torch dtype for ``--dtype``; None keeps the checkpoint's dtype."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else None
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unsupported dtype {name!r}; use auto, float32, float16 or bfloat16")
    return dtype


def measure_throughput(backend: SpanBackend, *, seconds: float = 0.3) -> float:
    """Tokens per second through one block during single-token inference steps.

    A rough self-estimate to announce until the marketplace's probes measure the provider.
    """
    cache = backend.new_cache(start=backend.start, end=backend.end, batch_size=1, max_length=256)
    hidden = torch.zeros(1, 1, backend.info.hidden_size, dtype=backend.dtype, device=backend.device)
    steps, started = 0, time.perf_counter()
    while steps < 255 and (steps < 3 or time.perf_counter() - started < seconds):
        backend.inference_step(cache, hidden, steps, backend.start, backend.end)
        steps += 1
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    elapsed = time.perf_counter() - started
    return steps * (backend.end - backend.start) / elapsed


class Announcer:
    """Keeps the agent's signed record fresh in the DHT and withdraws it on shutdown."""

    def __init__(self, node: DHTNode, identity: Identity, server: ProviderServer, config: AgentConfig,
                 throughput: float, maddrs: list[str]) -> None:
        self.node, self.identity, self.server, self.config = node, identity, server, config
        self.throughput, self.maddrs = throughput, maddrs

    def record(self, state: str, ttl: float) -> ServerRecord:
        backend = self.server.backend
        return ServerRecord(
            peer_id=self.identity.peer_id, model_id=self.server.model_id, start=backend.start, end=backend.end,
            state=state, throughput=self.throughput, dtype=str(backend.dtype).removeprefix("torch."),
            cache_tokens_left=self.server.cache_tokens_left, expires_at=time.time() + ttl,
            maddrs=tuple(self.maddrs),
        )

    async def announce(self, state: str = ServerState.ONLINE) -> None:
        ok = await announce_span(self.node, self.identity, self.record(state, self.config.announce_ttl))
        if not ok:
            logger.warning("some DHT stores of our record failed; will retry at the next announcement")

    async def run(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception as e:  # keep announcing: a transient DHT failure must not stop serving
                logger.warning(f"announcement failed: {e!r}")
            await asyncio.sleep(self.config.announce_period)

    async def withdraw(self) -> None:
        # A DHT cannot delete; overwrite with a short-lived offline record so clients drop us now.
        await announce_span(self.node, self.identity, self.record(ServerState.OFFLINE, 5.0))


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then withdraw from the DHT and shut everything down."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.blocks is None:
        raise ValueError("choose the blocks to serve with --blocks START:END")
    start, end = config.blocks
    backend = SpanBackend(config.model_path, start, end, dtype=resolve_dtype(config.dtype, config.device),
                          device=config.device)
    model_id = backend.info.model_id
    throughput = config.throughput or measure_throughput(backend)
    identity_path = config.identity_path or Path(os.environ.get("HIVEMART_HOME", ".hivemart")) / "provider.key"
    identity = Identity.load_or_create(identity_path)

    p2p = await start_p2p(initial_peers=config.initial_peers, identity_path=identity_path,
                          host_maddrs=config.host_maddrs, announce_maddrs=config.announce_maddrs)
    node = server = announce_task = None
    try:
        node = await DHTNode.create(p2p=p2p, initial_peers=config.initial_peers or None,
                                    client_mode=False, ensure_bootstrap_success=bool(config.initial_peers),
                                    record_validator=SignedRecordValidator())
        # Digests of the weights as loaded from disk, so clients can check what we serve.
        digests = [block_digest(config.model_path, i) for i in range(start, end)]
        server = ProviderServer(backend, config, p2p, model_id, block_digests=digests)
        await server.start()
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        announcer = Announcer(node, identity, server, config, throughput, maddrs)
        await announcer.announce()
        announce_task = asyncio.create_task(announcer.run())
        _report_ready(config, {"peer_id": identity.peer_id, "maddrs": maddrs, "model_id": model_id,
                               "start": start, "end": end, "throughput": throughput,
                               "dtype": str(backend.dtype).removeprefix("torch.")})
        logger.info(f"serving blocks {start}:{end} of {model_id} as {identity.peer_id}")
        await stop.wait()
        logger.info("shutting down: withdrawing our record")
        announce_task.cancel()
        server.accepting = False
        try:
            await asyncio.wait_for(announcer.withdraw(), timeout=5)
        except Exception as e:
            logger.warning(f"could not withdraw our DHT record ({e!r}); it expires on its own")
    finally:
        if announce_task is not None:
            announce_task.cancel()
        if server is not None:
            await server.stop()
        if node is not None:
            await node.shutdown()
        await p2p.shutdown()


def _report_ready(config: AgentConfig, ready: dict) -> None:
    line = json.dumps({"ready": ready})
    if config.ready_file is not None:
        tmp = Path(str(config.ready_file) + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(config.ready_file)
    else:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def serve_forever(config: AgentConfig) -> None:
    """Run the agent on this thread until SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(config, stop)

    # uvloop's event loop cuts the per-message overhead of every hop noticeably.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
