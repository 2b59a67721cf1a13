"""The provider server composed from its parts, and its lifecycle: start registers every RPC
(and refuses the names of older protocol versions), stop and drain end the work in hand,
``info`` tells clients what this provider serves and has room for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import protocols

from hivemart_core.models.backend import SpanBackend
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.framing import write_message
from hivemart_core.protocol.rpc import (
    LEGACY_RPC_NAMES,
    PROTOCOL_VERSION,
    RPC_ADAPTER,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    error_header,
)
from provider_agent.limits import widen_accept_backlog
from provider_agent.server.adapters import AdapterRPCs
from provider_agent.server.relay import RelayRPCs
from provider_agent.server.span_rpcs import SpanRPCs

logger = get_logger(__name__)


class ProviderServer(RelayRPCs, SpanRPCs, AdapterRPCs):
    """Serves one span of blocks over a hivemind P2P instance.

    Composed from one part per idea (see the package docstring); tests patch its methods by
    name (``ProviderServer._compute_step``), which reach every part through ``self``."""

    async def start(self) -> None:
        handlers: dict[str, Callable[..., Awaitable[None]]] = {
            RPC_INFO: self._handle_info,
            RPC_FORWARD: self._handle_forward,
            RPC_BACKWARD: self._handle_backward,
            RPC_INFERENCE: self._handle_inference,
            RPC_PUSH: self._handle_push,
            RPC_ADAPTER: self._handle_adapter,
        }
        for name, handler in handlers.items():
            await self.p2p.add_binary_stream_handler(name, self._guard(name, handler))
        for name in LEGACY_RPC_NAMES:  # older clients get a clear refusal, not "protocol not supported"
            await self.p2p.add_binary_stream_handler(name, self._guard(name, self._handle_old_version))
        listen_path = self.p2p._client_listen_maddr.value_for_protocol(protocols.P_UNIX)  # noqa: SLF001
        if not widen_accept_backlog(listen_path):
            logger.warning(
                "could not widen the accept queue of the p2p handler socket: bursts of more than 100 "
                "streams may be reset"
            )
        self._spawn(self._expire_idle_sessions())
        self._spawn(self._expire_adapters())

    async def stop(self) -> None:
        self.accepting = False
        for task in list(self._tasks):
            task.cancel()
        for writer in self._push_links.values():
            writer.close()
        for session in list(self.sessions.values()):
            if session.ticket is not None:  # sign the totals now, for the agent's last upload
                self.tickets.final_receipt(session.ticket, session.spec.session_id)
            session.client.close()
        self.adapters.clear()
        self.graphs.clear()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()

    async def drain(self, timeout: float) -> int:
        """Refuse new work and wait up to ``timeout`` s for open sessions to end; then close
        the rest (their clients replay them on another provider). Returns how many were closed."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        # Sessions end on many paths (client close, errors, timeouts); polling during a drain is cheap.
        while self.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        remaining = list(self.sessions.values())
        for session in remaining:
            self._close_session(session)
            session.client.close()
        return len(remaining)

    def replace_backend(self, backend: SpanBackend, block_digests: list[str]) -> None:
        """Serve another span (after :meth:`drain`) and accept work again."""
        if self.sessions:
            raise RuntimeError("drain the server before replacing its blocks")
        self.backend, self.block_digests = backend, block_digests
        self._yield_training_to_inference(backend)
        self.adapters.clear()  # they were for the old span; their clients create them again elsewhere
        self.graphs.clear()
        self.accepting = True

    # --- info -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        info = self.backend.info
        return {
            "type": "info",
            "protocol_version": PROTOCOL_VERSION,
            "peer_id": str(self.p2p.peer_id),
            "model_id": self.model_id,
            "start": self.backend.start,
            "end": self.backend.end,
            "dtype": str(self.backend.dtype).removeprefix("torch."),
            "hidden_size": info.hidden_size,
            "block_digests": self.block_digests,
            "accepting": self.accepting,
            "sessions": len(self.sessions),
            "max_sessions": self.config.max_sessions,
            "cache_bytes_left": self.cache_bytes_left,
            "cache_tokens_left": self.cache_tokens_left,
            "max_session_length": self.config.max_session_length,
            "max_batch_size": self.config.max_batch_size,
            "max_request_tokens": self.config.max_request_tokens,
            "adapter_bytes_left": max(0, self.config.adapter_bytes - self.adapters.used_bytes),
            "max_adapter_rank": self.config.max_adapter_rank,
            "graphs_kept": len(self.graphs),
            "graph_bytes_used": self.graphs.used_bytes,
            "graph_bytes": self.config.graph_bytes,
            "batching": {"enabled": self.batcher.enabled, **self.batcher.stats.to_dict()},
        }

    async def _handle_old_version(
        self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A request on an RPC name of an older protocol version: refused, naming both versions."""
        name = getattr(stream_info, "proto", "")
        version = LEGACY_RPC_NAMES.get(str(name), 1)
        await write_message(
            writer,
            error_header(
                codes.UNSUPPORTED_VERSION,
                f"this provider speaks protocol v{PROTOCOL_VERSION}, the request came on v{version}; upgrade the client",
            ),
        )
        await self._discard_rest(reader)

    async def _handle_info(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._first_head(reader, self._no_tensors)
        await write_message(writer, self.info())
