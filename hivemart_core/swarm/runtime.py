"""A background event loop that owns the client's p2p daemon and DHT node.

The SDK's public API is synchronous (``model.generate(...)``); all network work runs as
coroutines on this loop. Whole operations (a generation, a forward pass) are submitted at
once, so the thread hand-off is paid per call, not per token or per hop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from hivemart_core.errors import SwarmError
from hivemart_core.swarm.dht import SignedRecordValidator
from hivemart_core.swarm.p2p import start_p2p

__all__ = ["SwarmRuntime"]

T = TypeVar("T")


class SwarmRuntime:
    """Connects to a swarm: ``SwarmRuntime(initial_peers=[...])``, then ``runtime.run(coro)``.

    Use as a context manager or call :meth:`shutdown`; the p2p daemon also dies with the
    process if it is killed.
    """

    def __init__(
        self,
        initial_peers: Sequence[str],
        *,
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        startup_timeout: float = 60.0,
    ) -> None:
        if not initial_peers:
            raise SwarmError(
                "no initial peers: pass the multiaddr of a bootstrap node (printed by `hivemart-provider dht`)"
            )
        self.initial_peers = list(initial_peers)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="hivemart-swarm", daemon=True)
        self._thread.start()
        self.p2p: P2P
        self.dht: DHTNode
        try:
            self.run(self._start(list(host_maddrs)), timeout=startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self, host_maddrs: list[str]) -> None:
        self.p2p = await start_p2p(initial_peers=self.initial_peers, host_maddrs=host_maddrs, client_mode=True)
        self.dht = await DHTNode.create(
            p2p=self.p2p, initial_peers=self.initial_peers, client_mode=True, record_validator=SignedRecordValidator()
        )

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the swarm loop and return its result (re-raising its exception)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SwarmRuntime.run called from its own loop; await the coroutine instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    @property
    def peer_id(self) -> str:
        return str(self.p2p.peer_id)

    def shutdown(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            if getattr(self, "dht", None) is not None:
                await self.dht.shutdown()
            if getattr(self, "p2p", None) is not None:
                await self.p2p.shutdown()
            # hivemind leaves helper tasks behind; cancel them so the loop closes quietly.
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            self.submit(stop()).result(timeout=15)
        except Exception:
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> SwarmRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
