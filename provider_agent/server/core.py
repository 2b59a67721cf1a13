"""RPC I/O: the state every part of the server shares, and the stream plumbing every handler
uses (per-peer stream quotas, the first message's deadline, error replies that reach the
peer, the compute thread)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P
from hivemind.utils.logging import get_logger

from hivemart_core.errors import ProtocolError
from hivemart_core.models.adapters import AdapterStore
from hivemart_core.models.backend import KeptGraphs, SpanBackend
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.framing import Head, Limits, read_head, write_message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.rpc import RPC_ADAPTER, RPC_BACKWARD, RPC_FORWARD, RPC_INFO, error_header
from provider_agent.config import AgentConfig
from provider_agent.limits import PeerQuotas, Quotas
from provider_agent.metering import TicketBook
from provider_agent.server.batching import StepBatcher
from provider_agent.server.state import Session

logger = get_logger(__name__)

# Steps with at most this many tokens run on the event loop thread: handing a few
# milliseconds of work to a thread costs more latency than it saves. Larger work runs in
# the compute thread so that the loop keeps answering other peers.
_INLINE_TOKENS = 64
# One request, one reply: the handler waits this long for the caller to close first (see _guard).
_REQUEST_REPLY = frozenset({RPC_INFO, RPC_FORWARD, RPC_BACKWARD, RPC_ADAPTER})
_CLOSE_WAIT_S = 30.0

_T = TypeVar("_T")


class ServerCore:
    """The server's state and stream plumbing; the RPCs are in the parts built on it."""

    def __init__(
        self,
        backend: SpanBackend,
        config: AgentConfig,
        p2p: P2P,
        model_id: str,
        *,
        block_digests: list[str],
        identity: Identity,
        tickets: TicketBook | None = None,
    ) -> None:
        self.backend, self.config, self.p2p, self.model_id = backend, config, p2p, model_id
        self.identity = identity  # signs step records (the same key as the p2p peer id)
        # None: free mode, no tickets asked and no receipts (local swarms, benchmarks).
        self.tickets = tickets
        self.block_digests = block_digests
        self.sessions: dict[str, Session] = {}
        self._by_next_session: dict[str, Session] = {}
        self._reserved_bytes = 0
        self._push_links: dict[str, asyncio.StreamWriter] = {}
        self._push_link_lock = asyncio.Lock()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemart-compute")
        self._limits = Limits(
            max_tensors=4,
            max_tensor_bytes=config.max_request_tokens * backend.info.hidden_size * 4,
            read_timeout=config.stream_idle_timeout,
        )
        self._no_tensors = Limits(max_tensors=0, read_timeout=config.stream_idle_timeout)
        self.quotas = PeerQuotas(
            Quotas(
                streams_per_peer=config.max_streams_per_peer,
                buffer_bytes=config.buffer_bytes,
                peer_buffer_bytes=config.peer_buffer_bytes,
                sessions_per_peer=config.max_sessions_per_peer,
                peer_cache_bytes=config.cache_bytes // 4
                if config.peer_cache_bytes is None
                else config.peer_cache_bytes,
            )
        )
        self.adapters = AdapterStore(
            budget_bytes=config.adapter_bytes, max_rank=config.max_adapter_rank, ttl=config.adapter_ttl
        )
        self.graphs = KeptGraphs(budget_bytes=config.graph_bytes, ttl=config.graph_ttl)
        # Adapter weights travel as float32 whatever the compute dtype.
        self._adapter_limits = Limits(
            max_tensors=1,
            max_tensor_bytes=max(4, config.adapter_bytes // backend.dtype.itemsize * 4),
            read_timeout=config.stream_idle_timeout,
        )
        self._tasks: set[asyncio.Task] = set()
        self.accepting = True
        self.batcher = StepBatcher(
            self._run_compute,
            enabled=config.batching,
            max_sessions=config.batch_max_sessions,
            window_s=config.batch_window,
        )
        self._yield_training_to_inference(backend)

    def _yield_training_to_inference(self, backend: SpanBackend) -> None:
        """Training forwards on ``backend`` wait before each block while inference steps are due."""
        backend.between_layers = self.batcher.wait_for_inference

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _guard(self, name: str, handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def guarded(stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = str(stream_info.peer_id)
            if not self.quotas.open_stream(peer):
                await self._try_send(
                    writer,
                    error_header(
                        codes.BUSY,
                        "this peer has as many streams open here as one peer may; finish some before opening more",
                    ),
                )
                writer.close()
                return
            try:
                await handler(stream_info, reader, writer)
                if name in _REQUEST_REPLY:
                    # p2pd resets a stream whose handler end closes while the caller's end is
                    # open, and the reset drops reply bytes the caller's daemon still buffers:
                    # replies arrived cut short under load (issue 14). The caller closes once it
                    # read the reply, so waiting for that (bounded) keeps replies whole.
                    await self._discard_rest(reader, max_bytes=64 * 1024, seconds=_CLOSE_WAIT_S)
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                pass  # the peer went away; nothing to answer
            except TimeoutError:
                logger.info(f"{name} from {peer}: no request within {self.config.stream_idle_timeout:g} s; closed")
            except ProtocolError as e:
                logger.info(f"{name} from {stream_info.peer_id}: malformed message: {e}")
                await self._try_send(writer, error_header(e.code, str(e)))
                await self._discard_rest(reader)
            except Exception as e:  # never let one request take the server down
                logger.exception(f"{name} from {stream_info.peer_id} failed: {e}")
                await self._try_send(writer, error_header(codes.INTERNAL, f"{type(e).__name__}: {e}"))
            finally:
                self.quotas.close_stream(peer)
                writer.close()

        return guarded

    async def _first_head(self, reader: asyncio.StreamReader, limits: Limits) -> Head:
        """The head of a stream's first message, which must come within the idle timeout (a
        stream that sends nothing holds a descriptor for nothing)."""
        return await asyncio.wait_for(read_head(reader, limits), self.config.stream_idle_timeout)

    @staticmethod
    async def _discard_rest(
        reader: asyncio.StreamReader, max_bytes: int = 64 * 1024 * 1024, seconds: float = 2.0
    ) -> None:
        """Read and drop what the peer is still sending (bounded), so that closing the stream
        does not reset it before the peer has read our error reply."""

        async def drain() -> None:
            left = max_bytes
            while left > 0 and (chunk := await reader.read(min(left, 1 << 20))):
                left -= len(chunk)

        try:
            await asyncio.wait_for(drain(), seconds)
        except (TimeoutError, ConnectionError):
            pass

    @staticmethod
    async def _try_send(
        writer: asyncio.StreamWriter, header: dict[str, Any], tensors: tuple[torch.Tensor, ...] = ()
    ) -> None:
        try:
            await write_message(writer, header, tensors)
        except (ConnectionError, BrokenPipeError, RuntimeError):
            pass

    async def _run_compute(self, fn: Callable[[], _T], tokens: int) -> _T:
        """``fn()``, inline when small (``tokens``), else in the compute thread."""
        if tokens <= _INLINE_TOKENS:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)
