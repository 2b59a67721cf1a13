"""The provider agent: load a span, serve it over hivemind, announce it, and stop cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import uvloop
from hivemind.dht.node import DHTNode
from hivemind.utils.logging import get_logger

from hivemart_core.errors import HivemartError
from hivemart_core.logs import progress
from hivemart_core.models import block_digest, load_model_info
from hivemart_core.models.backend import SpanBackend
from hivemart_core.placement import Span, choose_span, should_move
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import MAX_RECORD_TTL_S, ServerRecord, ServerState
from hivemart_core.swarm.dht import SignedRecordValidator, announce_span, fetch_span_records
from hivemart_core.swarm.p2p import daemon_alive, start_p2p, stop_p2p
from provider_agent.config import AgentConfig
from provider_agent.identity_lock import hold_identity
from provider_agent.market import MarketLink, Offer, hardware
from provider_agent.metering import TicketBook
from provider_agent.server import ProviderServer
from provider_agent.signals import install_stop_signals
from provider_agent.threads import auto_threads

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
    """Keeps the agent's signed record fresh in the DHT and withdraws it on shutdown.

    A DHT node keeps, per block and peer, only the record that expires last and refuses any
    that expires earlier; so every record this agent stores expires later than the one
    before it, or it would not replace it (a withdrawal would be refused and clients would
    see us online until the old record expired).
    """

    def __init__(
        self,
        node: DHTNode,
        identity: Identity,
        server: ProviderServer,
        config: AgentConfig,
        throughput: float,
        maddrs: list[str],
    ) -> None:
        self.node, self.identity, self.server, self.config = node, identity, server, config
        self.throughput, self.maddrs = throughput, maddrs
        self.state = ServerState.ONLINE
        self._expires_at = 0.0  # of the latest record we made

    def _next_expiry(self, ttl: float) -> float:
        now = time.time()
        expires_at = min(max(now + ttl, self._expires_at + 1.0), now + MAX_RECORD_TTL_S)
        self._expires_at = expires_at
        return expires_at

    def record(self, state: str, ttl: float) -> ServerRecord:
        """Our record in ``state``, valid for ``ttl`` seconds or, if longer, until just after
        the previous one expires."""
        backend = self.server.backend
        return ServerRecord(
            peer_id=self.identity.peer_id,
            model_id=self.server.model_id,
            start=backend.start,
            end=backend.end,
            state=state,
            throughput=self.throughput,
            dtype=str(backend.dtype).removeprefix("torch."),
            cache_tokens_left=self.server.cache_tokens_left,
            expires_at=self._next_expiry(ttl),
            maddrs=tuple(self.maddrs),
            requires_ticket=self.server.tickets is not None,
        )

    async def announce(self) -> None:
        ok = await announce_span(self.node, self.identity, self.record(self.state, self.config.announce_ttl))
        if not ok:
            logger.warning("some DHT stores of our record failed; will retry at the next announcement")

    async def run(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception as e:  # keep announcing: a transient DHT failure must not stop serving
                logger.warning(f"announcement failed: {e!r}")
            await asyncio.sleep(self.config.announce_period)

    async def withdraw(self) -> bool:
        """Replace our records with offline ones so that clients drop us now; False (and a
        warning) when some DHT node did not take them."""
        # A DHT cannot delete: overwrite with an offline record, which expires after the online one.
        record = self.record(ServerState.OFFLINE, self.config.announce_ttl)
        ok = await announce_span(self.node, self.identity, record)
        if not ok:
            logger.warning(
                f"some DHT nodes refused our offline record; clients may still see blocks "
                f"{record.start}:{record.end} online here for up to {self.config.announce_ttl:.0f} s"
            )
        return ok


async def swarm_spans(node: DHTNode, model_id: str, num_blocks: int, *, exclude: str) -> list[Span]:
    """``(start, end, throughput)`` of every live provider of the model but ``exclude``."""
    records = await fetch_span_records(node, model_id, range(num_blocks))
    return [(r.start, r.end, r.throughput) for r in records.values() if r.peer_id != exclude]


async def choose_blocks(
    config: AgentConfig, model_id: str, num_blocks: int, node: DHTNode, identity: Identity
) -> tuple[int, int]:
    """Where a joining agent is needed most: the marketplace's answer (from measured
    throughputs) when one is configured and answers, else Petals' rule over DHT records."""
    if config.market_url:
        from hivemart_core.api import Client

        def ask() -> tuple[int, int]:
            with Client(api_key=config.api_key, base_url=config.market_url, timeout=10.0) as client:
                return client.models.placement(model_id, config.num_blocks)

        try:
            start, end = await asyncio.get_running_loop().run_in_executor(None, ask)
            logger.info(f"the marketplace says blocks {start}:{end} need us most")
            return start, end
        except HivemartError as e:
            logger.warning(f"the marketplace could not place us ({e}); choosing from the DHT instead")
    others = await swarm_spans(node, model_id, num_blocks, exclude=identity.peer_id)
    start, end = choose_span(num_blocks, config.num_blocks, others)
    logger.info(f"the swarm needs blocks {start}:{end} most; serving them")
    return start, end


def ticket_book(config: AgentConfig, identity: Identity, model_id: str) -> TicketBook | None:
    """The agent's ticket policy: None (free mode) unless it knows or can fetch a platform key."""
    if config.platform_key is None and not config.market_url:
        logger.warning("free mode: no --platform-key and no --market, so no tickets are asked and no receipts signed")
        return None
    key = bytes.fromhex(config.platform_key) if config.platform_key else None
    return TicketBook(identity=identity, model_id=model_id, platform_key=key, receipt_every=config.receipt_every)


def start_market_link(
    config: AgentConfig, identity: Identity, book: TicketBook, server: ProviderServer, announcer: Announcer
) -> MarketLink:
    """Start talking to the marketplace: platform key, registration, heartbeats, receipt uploads."""
    gpu, gpu_memory_mb = hardware(config.device)

    def offer() -> Offer:
        backend = server.backend
        return Offer(
            model_id=server.model_id,
            start=backend.start,
            end=backend.end,
            block_digests=tuple(server.block_digests),
            price=config.price,
            gpu=gpu,
            gpu_memory_mb=gpu_memory_mb,
        )

    link = MarketLink(config, identity, book, offer=offer, status=lambda: (announcer.state, announcer.throughput))
    link.start()
    return link


def load_span(config: AgentConfig, start: int, end: int) -> tuple[SpanBackend, list[str]]:
    """Load blocks [start, end) and the digests of exactly the weights loaded. Slow (disk and
    hashing): coroutines call it through ``asyncio.to_thread``, so the DHT keeps answering."""
    dtype = resolve_dtype(config.dtype, config.device)
    logger.info(
        f"loading blocks {start}:{end} of {config.model_path.name} onto {config.device} "
        f"({str(dtype).removeprefix('torch.') if dtype else 'checkpoint dtype'})..."
    )
    started = time.perf_counter()
    backend = SpanBackend(config.model_path, start, end, dtype=dtype, device=config.device)
    # Digests of the weights as stored on disk, so clients can check what we serve.
    digests = []
    with progress(end - start, "hashing the served weights", unit="block") as bar:
        for i in range(start, end):
            digests.append(block_digest(config.model_path, i))
            bar.update()
    logger.info(f"loaded blocks {start}:{end} in {time.perf_counter() - started:.1f} s")
    return backend, digests


def _measured_throughput(backend: SpanBackend) -> float:
    logger.info("measuring throughput (--throughput skips this)...")
    throughput = measure_throughput(backend)
    logger.info(f"measured {throughput:.1f} tokens/s per block")
    return throughput


def configure_torch_threads(config: AgentConfig, backend: SpanBackend) -> None:
    """Size torch's thread pool for the span; called on the event loop's thread, which computes
    small requests itself."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    elif backend.device.type == "cpu":
        torch.set_num_threads(auto_threads(backend.block_bytes))


class Rebalancer:
    """Moves the agent to another span when that raises the swarm's weakest block enough.

    Moving drains first: the agent announces itself draining (clients stop choosing it),
    refuses new sessions, lets open ones finish for up to ``drain_timeout`` and closes the
    rest, whose clients replay them on other providers exactly. Then it withdraws its old
    records, loads the new blocks and announces them.
    """

    def __init__(
        self, config: AgentConfig, node: DHTNode, server: ProviderServer, announcer: Announcer, identity: Identity
    ) -> None:
        self.config, self.node, self.server, self.announcer, self.identity = config, node, server, announcer, identity

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.rebalance_period)
            try:
                await self.check()
            except Exception as e:  # a failed check must not stop serving
                logger.warning(f"rebalancing check failed: {e!r}")

    async def check(self) -> bool:
        backend = self.server.backend
        others = await swarm_spans(
            self.node, self.server.model_id, backend.info.num_blocks, exclude=self.identity.peer_id
        )
        move, span = should_move(
            backend.info.num_blocks,
            (backend.start, backend.end),
            self.announcer.throughput,
            others,
            self.config.rebalance_factor,
        )
        if move:
            await self.move_to(*span)
        return move

    async def move_to(self, start: int, end: int) -> None:
        old = (self.server.backend.start, self.server.backend.end)
        logger.info(f"moving from blocks {old[0]}:{old[1]} to {start}:{end}: draining")
        self.announcer.state = ServerState.DRAINING
        await self.announcer.announce()
        closed = await self.server.drain(self.config.drain_timeout)
        if closed:
            logger.info(
                f"closed {closed} sessions still open after {self.config.drain_timeout} s; their clients fail over"
            )
        await self.announcer.withdraw()
        backend, digests = await asyncio.to_thread(load_span, self.config, start, end)
        configure_torch_threads(self.config, backend)
        self.server.replace_backend(backend, digests)
        self.announcer.state = ServerState.ONLINE
        await self.announcer.announce()
        logger.info(f"now serving blocks {start}:{end}")


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then withdraw from the DHT and shut everything down.

    The identity is locked while the agent runs: a second agent on it refuses to start
    (:class:`~provider_agent.identity_lock.IdentityInUseError`)."""
    if config.blocks is None and not config.num_blocks:
        raise ValueError("say which blocks to serve (--blocks START:END) or how many (--num-blocks N)")
    identity_path = config.identity_path or Path(os.environ.get("HIVEMART_HOME", ".hivemart")) / "provider.key"
    with hold_identity(identity_path):
        await _run_agent(config, identity_path, stop)


async def _run_agent(config: AgentConfig, identity_path: Path, stop: asyncio.Event) -> None:
    logger.info(f"reading {config.model_path}...")
    info = load_model_info(config.model_path)
    identity = Identity.load_or_create(identity_path)
    peers = len(config.initial_peers)
    logger.info(
        f"joining the swarm through {peers} initial peer{'s' if peers != 1 else ''} as {identity.peer_id}..."
        if peers
        else f"starting a new swarm as {identity.peer_id} (no --initial-peers)..."
    )
    p2p = await start_p2p(
        initial_peers=config.initial_peers,
        identity_path=identity_path,
        host_maddrs=config.host_maddrs,
        announce_maddrs=config.announce_maddrs,
    )
    node = server = market = None
    tasks: list[asyncio.Task] = []
    try:
        node = await DHTNode.create(
            p2p=p2p,
            initial_peers=config.initial_peers or None,
            client_mode=False,
            ensure_bootstrap_success=bool(config.initial_peers),
            record_validator=SignedRecordValidator(),
        )
        start, end = config.blocks or await choose_blocks(config, info.model_id, info.num_blocks, node, identity)
        backend, digests = await asyncio.to_thread(load_span, config, start, end)
        configure_torch_threads(config, backend)
        throughput = config.throughput or _measured_throughput(backend)
        book = ticket_book(config, identity, info.model_id)
        server = ProviderServer(
            backend, config, p2p, info.model_id, block_digests=digests, identity=identity, tickets=book
        )
        await server.start()
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        announcer = Announcer(node, identity, server, config, throughput, maddrs)
        await announcer.announce()
        if config.market_url and book is not None:
            market = start_market_link(config, identity, book, server, announcer)
        tasks.append(asyncio.create_task(announcer.run()))
        if config.blocks is None and config.rebalance_period > 0:
            tasks.append(asyncio.create_task(Rebalancer(config, node, server, announcer, identity).run()))
        _report_ready(
            config,
            {
                "peer_id": identity.peer_id,
                "maddrs": maddrs,
                "model_id": info.model_id,
                "start": start,
                "end": end,
                "throughput": throughput,
                "dtype": str(backend.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(),
            },
        )
        logger.info(
            f"serving blocks {start}:{end} of {info.model_id} as {identity.peer_id} at {' '.join(maddrs)} "
            f"({throughput:.1f} tokens/s/block, {'tickets required' if book is not None else 'free mode'})"
        )
        await stop.wait()
        logger.info("shutting down: withdrawing our record")
        for task in tasks:
            task.cancel()
        server.accepting = False
        await _withdraw(announcer, p2p)
    finally:
        # Every step is bounded in time: a process asked to stop must stop (see stop_p2p).
        for task in tasks:
            task.cancel()
        if server is not None:
            await server.stop()
        if market is not None:
            await market.close()  # after the server: its last receipts go out too
        await stop_p2p(p2p, *([node.shutdown] if node is not None else []), timeout=_SHUTDOWN_STEP_S)


_SHUTDOWN_STEP_S = 5.0


async def _withdraw(announcer: Announcer, p2p: Any) -> None:
    if not daemon_alive(p2p):  # killed with us (a signal to the whole group): nothing to talk through
        logger.warning("the p2p daemon is gone; our DHT record expires on its own")
        return
    try:
        await asyncio.wait_for(announcer.withdraw(), timeout=_SHUTDOWN_STEP_S)
    except Exception as e:
        logger.warning(f"could not withdraw our DHT record ({e!r}); it expires on its own")


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
        install_stop_signals(asyncio.get_running_loop(), stop)
        await run_agent(config, stop)

    # uvloop's event loop cuts the per-message overhead of every hop noticeably.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
