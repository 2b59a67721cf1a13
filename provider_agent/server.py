"""The provider's RPC handlers: info, forward, backward, inference sessions and pushes.

Inference runs as a chain: the client opens a session on every provider of its route and
sends each step to the first one; each provider pushes its output straight to the next
provider's session (``hivemart.push``) and the last one answers the client. A generated
token therefore costs one network message per hop instead of a client round trip per hop.
Middle providers also return their outputs to the client when asked (``return_outputs``),
after the push, so the client keeps the history it needs to replay a span on a backup.
Every step's output travels with a signed step record (``hivemart_core.protocol.commitments``):
a push whose record is not the pusher's, about that very tensor, is refused, and the record
of an accepted push goes back to the client with the output computed from it, so that a
provider pushing one thing and returning another is the one blamed.

Every request is validated before it touches a tensor; a bad request gets an error reply
and the server keeps serving everyone else. A framing error closes only that stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import protocols

from hivemart_core.errors import ProtocolError
from hivemart_core.models.adapters import Adapter, AdapterError, AdapterStore
from hivemart_core.models.backend import KeptGraphs, LoraWeights, SpanBackend, SpanKVCache
from hivemart_core.models.lora import LoraSpec, block_numel, init_weights
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.commitments import StepRecord, StepRecordError, digest_hex, sign_step
from hivemart_core.protocol.framing import Head, Limits, Message, read_head, read_message, read_tensors, write_message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import work_units
from hivemart_core.protocol.rpc import (
    LEGACY_RPC_NAMES,
    PROTOCOL_VERSION,
    RPC_ADAPTER,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    AdapterRequest,
    ErrorReply,
    OpenSession,
    Relink,
    SpanRequest,
    Step,
    error_header,
    receipt_ack,
)
from hivemart_core.protocol.tickets import JobTicket, TicketError
from provider_agent.config import AgentConfig
from provider_agent.limits import BufferLease, PeerQuotas, Quotas, RequestError, widen_accept_backlog
from provider_agent.metering import Charge, TicketBook, outputs_digest

logger = get_logger(__name__)


def _wire_torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)  # a name the framing checked against its list of wire dtypes


# Steps with at most this many tokens run on the event loop thread: handing a few
# milliseconds of work to a thread costs more latency than it saves. Larger work runs in
# the compute thread so that the loop keeps answering other peers.
_INLINE_TOKENS = 64
_RECENT_STEPS = 32
# One request, one reply: the handler waits this long for the caller to close first (see _guard).
_REQUEST_REPLY = frozenset({RPC_INFO, RPC_FORWARD, RPC_BACKWARD, RPC_ADAPTER})
_CLOSE_WAIT_S = 30.0


# How long a cleanly closed session waits for the client's ack of its final receipt.
_CLOSE_ACK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Delivered:
    """A step's output as delivered, kept to answer a duplicate of the step the same way."""

    step_id: int
    position: int
    output: torch.Tensor
    record: StepRecord  # what we signed about the step
    input_record: StepRecord | None  # the pusher's record of our input (None: the client sent it)

    def header(self) -> dict[str, Any]:
        header = {"type": "output", "step_id": self.step_id, "position": self.position, "record": self.record.to_dict()}
        if self.input_record is not None:
            header["input_record"] = self.input_record.to_dict()
        return header


@dataclass
class Session:
    spec: OpenSession
    cache: SpanKVCache
    reserved_bytes: int
    client: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recent_steps: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last_output: _Delivered | None = None
    last_step_id: int = -1  # the highest step id computed: an older one is never computed (signed) again
    last_used: float = field(default_factory=time.monotonic)
    ticket: JobTicket | None = None  # what pays for the session (None in free mode)
    peer: str = ""  # the client that opened it (its quotas count the session)
    # Signed into every step record: records of a session reopened under the same id differ.
    instance: str = field(default_factory=lambda: secrets.token_hex(8))


class ProviderServer:
    """Serves one span of blocks over a hivemind P2P instance."""

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

    # --- lifecycle --------------------------------------------------------------------------

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
        }

    @property
    def cache_bytes_left(self) -> int:
        return max(0, self.config.cache_bytes - self._reserved_bytes)

    @property
    def cache_tokens_left(self) -> int:
        per_token = self.backend.cache_bytes(
            num_layers=self.backend.end - self.backend.start, batch_size=1, max_length=1
        )
        return self.cache_bytes_left // per_token

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

    # --- validation ---------------------------------------------------------------------------

    def _check_span(self, start: int, end: int) -> None:
        if not (self.backend.start <= start < end <= self.backend.end):
            raise RequestError(
                codes.BAD_SPAN,
                f"blocks {start}:{end} are outside this provider's span {self.backend.start}:{self.backend.end}",
            )

    def _check_hidden(self, tensor: torch.Tensor, what: str, *, batch_size: int | None = None) -> None:
        hidden_size = self.backend.info.hidden_size
        if tensor.ndim != 3 or tensor.shape[2] != hidden_size or tensor.shape[1] == 0 or tensor.shape[0] == 0:
            raise RequestError(
                codes.BAD_SHAPE,
                f"{what} must have shape [batch, tokens, {hidden_size}] with "
                f"batch, tokens >= 1; got {list(tensor.shape)}",
            )
        if tensor.dtype != self.backend.dtype:
            raise RequestError(
                codes.BAD_DTYPE, f"{what} must be {self.backend.dtype} (this provider's dtype); got {tensor.dtype}"
            )
        if batch_size is not None and tensor.shape[0] != batch_size:
            raise RequestError(
                codes.BAD_SHAPE, f"{what} has batch {tensor.shape[0]}; the session was opened for {batch_size}"
            )
        if tensor.shape[0] > self.config.max_batch_size:
            raise RequestError(
                codes.TOO_LARGE,
                f"batch {tensor.shape[0]} exceeds this provider's limit of {self.config.max_batch_size}",
            )
        if tensor.shape[0] * tensor.shape[1] > self.config.max_request_tokens:
            raise RequestError(
                codes.TOO_LARGE,
                f"{tensor.shape[0] * tensor.shape[1]} tokens exceed this provider's "
                f"limit of {self.config.max_request_tokens} per request",
            )
        if tensor.device.type != "meta":
            self._check_finite(tensor, what)

    @staticmethod
    def _check_finite(tensor: torch.Tensor, what: str) -> None:
        if not torch.isfinite(tensor).all():
            raise RequestError(codes.BAD_VALUE, f"{what} contains NaN or infinite values")

    async def _run_compute(self, fn: Callable[[], torch.Tensor], tokens: int) -> torch.Tensor:
        if tokens <= _INLINE_TOKENS:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    # --- forward and backward -------------------------------------------------------------------

    def _parse_span_request(self, head: Head, tensor_names: tuple[str, ...]) -> SpanRequest:
        """Validate a forward or backward request from its head alone, before any tensor is
        read: span, tensor count, declared shapes and dtypes."""
        self._check_accepting()
        request = SpanRequest.from_header(head.header)
        self._check_span(request.start, request.end)
        with_prompts = request.tuning is not None and request.tuning.prompts
        names = tensor_names + (("deep prompts",) if with_prompts else ())
        if len(head.descriptors) != len(names):
            raise RequestError(codes.BAD_REQUEST, f"expected {len(names)} tensors: {', '.join(names)}")
        # Shape-only stand-ins: the checks below read shapes and dtypes, never data.
        declared = [torch.empty(shape, dtype=_wire_torch_dtype(dtype), device="meta") for dtype, shape in head.shapes()]
        tensors = declared[: len(tensor_names)]
        for tensor, name in zip(tensors, tensor_names, strict=False):
            self._check_hidden(tensor, name)
        if any(t.shape != tensors[0].shape for t in tensors):
            raise RequestError(
                codes.BAD_SHAPE,
                f"{' and '.join(tensor_names)} must have the same shape; got {[list(t.shape) for t in tensors]}",
            )
        if with_prompts:
            self._check_prompts(declared[-1], request, tensors[0])
        return request

    def _check_prompts(self, prompts: torch.Tensor, request: SpanRequest, hidden: torch.Tensor) -> None:
        blocks, (batch, tokens, hidden_size) = request.end - request.start, hidden.shape
        if (
            prompts.ndim != 4
            or prompts.shape[0] != blocks
            or prompts.shape[1] not in (1, batch)
            or not 1 <= prompts.shape[2] <= tokens
            or prompts.shape[3] != hidden_size
        ):
            raise RequestError(
                codes.BAD_SHAPE,
                f"deep prompts must have shape [{blocks}, 1 or {batch}, prefix, "
                f"{hidden_size}] with 1 <= prefix <= {tokens}; got {list(prompts.shape)}",
            )
        if prompts.dtype != self.backend.dtype:
            raise RequestError(codes.BAD_DTYPE, f"deep prompts must be {self.backend.dtype}; got {prompts.dtype}")
        if prompts.device.type != "meta":
            self._check_finite(prompts, "deep prompts")

    def _lora_for(self, request: SpanRequest, owner: str) -> LoraWeights | None:
        """The weights of the request's adapter for its blocks (None without an adapter)."""
        if request.tuning is None or request.tuning.adapter_id is None:
            return None
        adapter = self.adapters.get(request.tuning.adapter_id, owner)
        if not adapter.start <= request.start < request.end <= adapter.end:
            raise RequestError(
                codes.BAD_SPAN,
                f"adapter {adapter.adapter_id} covers blocks {adapter.start}:"
                f"{adapter.end}, not {request.start}:{request.end}",
            )
        rows = adapter.weights[request.start - adapter.start : request.end - adapter.start]
        return LoraWeights(adapter.spec, rows, request.start, source=adapter.weights)

    async def _serve_span(
        self,
        stream_info: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tensor_names: tuple[str, ...],
        reply_type: str,
        cost: int,
        work: Callable[
            [SpanRequest, list[torch.Tensor], torch.Tensor | None, LoraWeights | None],
            tuple[dict[str, Any], tuple[torch.Tensor, ...]],
        ],
    ) -> None:
        head = await self._first_head(reader, self._limits)
        try:
            # Everything the head alone decides (the ticket above all) is checked before a
            # single tensor byte is read: a refused peer makes the agent hold nothing.
            request = self._parse_span_request(head, tensor_names)
            ticket = None if self.tickets is None else self.tickets.check(request.ticket, request.start, request.end)
            lora = self._lora_for(request, str(stream_info.peer_id))
        except (RequestError, AdapterError, TicketError) as e:
            await write_message(writer, error_header(e.code, str(e)))
            await self._discard_rest(reader)
            return
        lease = self.quotas.lease(str(stream_info.peer_id))
        try:
            await self._serve_span_tensors(
                reader, writer, head, request, ticket, lora, tensor_names, reply_type, cost, work, lease
            )
        finally:
            lease.release()

    async def _serve_span_tensors(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: Head,
        request: SpanRequest,
        ticket: JobTicket | None,
        lora: LoraWeights | None,
        tensor_names: tuple[str, ...],
        reply_type: str,
        cost: int,
        work: Callable[..., tuple[dict[str, Any], tuple[torch.Tensor, ...]]],
        lease: BufferLease,
    ) -> None:
        """Read a checked request's tensors (within the peer's buffer budget), compute, reply."""
        received = await read_tensors(reader, head, self._limits, lease)
        tensors = received[: len(tensor_names)]
        prompts = received[-1] if len(received) > len(tensor_names) else None
        try:
            for tensor, name in zip(received, tensor_names + ("deep prompts",), strict=False):
                self._check_finite(tensor, name)
            charge = self._charge_span(request, ticket, tensors[0], backward=reply_type == "grad")
        except (RequestError, TicketError) as e:
            await write_message(writer, error_header(e.code, str(e)))
            return
        tokens = tensors[0].shape[0] * tensors[0].shape[1]
        try:
            extra, outputs = await self._run_compute(lambda: work(request, tensors, prompts, lora), cost * tokens)
        except BaseException:
            if charge is not None:
                charge.cancel()  # no output, no bill: give the reserved units back
            raise
        if charge is not None:
            extra = {**extra, "receipt": await self._commit_span(charge, outputs, tokens)}
        await write_message(writer, {"type": reply_type, **extra}, outputs)

    def _charge_span(
        self, request: SpanRequest, ticket: JobTicket | None, hidden: torch.Tensor, *, backward: bool
    ) -> Charge | None:
        """Reserve the units of a request on its (checked) ticket; None in free mode. A
        request without a session id counts on the session named like its ticket."""
        if ticket is None:
            return None
        if request.ack is not None:  # the payment channel: the client's countersignature of an earlier reply
            self.tickets.acknowledge(ticket, request.ack)
        return self.tickets.charge(
            ticket,
            request.session_id or ticket.ticket_id,
            tokens=hidden.shape[0] * hidden.shape[1],
            blocks=request.end - request.start,
            backward=backward,
        )

    async def _commit_span(self, charge: Charge, outputs: tuple[torch.Tensor, ...], tokens: int) -> dict[str, Any]:
        # Hashing a large output takes a while: off the event loop, like the compute.
        charge.commit_digest(await self._run_compute(lambda: outputs_digest(outputs), tokens))
        return self.tickets.receipt(charge.ticket, charge.session_id).to_dict()

    async def _handle_forward(
        self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        owner = str(stream_info.peer_id)

        def work(
            r: SpanRequest, t: list[torch.Tensor], prompts: torch.Tensor | None, lora: LoraWeights | None
        ) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
            if r.tuning is None or r.tuning.graph_id is None:
                return {}, (self.backend.forward(t[0], r.start, r.end, prompts=prompts, lora=lora),)
            # A training forward: keep the graph so that its backward need not recompute it.
            graph = self.backend.graph(t[0], r.start, r.end, prompts=prompts, lora=lora, lora_grads=r.tuning.lora_grads)
            graph.adapter_tensor = None if lora is None else lora.source
            kept = self.graphs.put(owner, r.tuning.graph_id, graph)
            return {"kept": kept}, (graph.outputs.detach(),)

        await self._serve_span(stream_info, reader, writer, ("hidden states",), "output", 1, work)

    async def _handle_backward(
        self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        owner = str(stream_info.peer_id)

        def work(
            r: SpanRequest, t: list[torch.Tensor], prompts: torch.Tensor | None, lora: LoraWeights | None
        ) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
            lora_grads = r.tuning is not None and r.tuning.lora_grads
            graph = None
            if r.tuning is not None and r.tuning.graph_id is not None:
                graph = self.graphs.pop(owner, r.tuning.graph_id)
                if graph is not None and not graph.matches(
                    t[0], r.start, r.end, prompts, None if lora is None else lora.source, lora_grads
                ):
                    graph = None  # not the forward this backward is for: recompute
            if graph is not None:
                grads = self.backend.grads(graph, t[1])
            else:
                grads = self.backend.backward(
                    t[0], t[1], r.start, r.end, prompts=prompts, lora=lora, lora_grads=lora_grads
                )
            # Reply order: grad_input, then grad_prompts and the adapter gradient when asked for.
            outputs = tuple(g for g in (grads.inputs, grads.prompts, grads.adapter) if g is not None)
            return {
                "prompts": grads.prompts is not None,
                "lora_grads": grads.adapter is not None,
                "recomputed": graph is None,
            }, outputs

        # A backward recomputes the forward first (unless its graph was kept): about three forwards of work.
        await self._serve_span(stream_info, reader, writer, ("hidden states", "output gradients"), "grad", 3, work)

    # --- LoRA adapters of fine-tuning jobs ---------------------------------------------------------

    async def _handle_adapter(
        self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        owner = str(stream_info.peer_id)
        head = await self._first_head(reader, self._adapter_limits)
        request = AdapterRequest.from_header(head.header)
        try:
            self._check_adapter_head(request, owner, head)  # the ticket and the budget before any weight
        except (RequestError, AdapterError, TicketError) as e:
            await write_message(writer, error_header(e.code, str(e)))
            await self._discard_rest(reader)
            return
        lease = self.quotas.lease(owner)
        try:
            received = await read_tensors(reader, head, self._adapter_limits, lease)
            try:
                reply, tensors = self._adapter_op(request, owner, received)
            except (RequestError, AdapterError, TicketError) as e:
                await write_message(writer, error_header(e.code, str(e)))
                return
        finally:
            lease.release()
        await write_message(
            writer, {"type": "adapter", "op": request.op, "adapter_id": request.adapter_id, **reply}, tensors
        )

    def _check_adapter_head(self, request: AdapterRequest, owner: str, head: Head) -> None:
        """Refuse, from its head alone, an adapter request that would be refused once read."""
        if request.op == "create":
            self._check_accepting()
            self._check_span(request.start, request.end)
            if self.tickets is not None:
                self.tickets.check(request.ticket, request.start, request.end)
            try:
                spec = LoraSpec(request.rank, request.alpha, request.targets)
            except ValueError as e:
                raise RequestError(codes.BAD_REQUEST, str(e)) from None
            shape = (request.end - request.start, block_numel(spec, self.backend.lora_shapes))
            self.adapters.check_new(request.adapter_id, spec, shape[0] * shape[1] * self.backend.dtype.itemsize)
            expected = [] if request.seed is not None else [shape]
        elif request.op == "set":
            expected = [tuple(self.adapters.get(request.adapter_id, owner).weights.shape)]
        else:
            expected = []
        declared = [shape for _, shape in head.shapes()]
        if declared != expected:
            code = codes.BAD_SHAPE if len(declared) == len(expected) else codes.BAD_REQUEST
            raise RequestError(
                code,
                f"an adapter {request.op} carries tensors of shapes "
                f"{[list(e) for e in expected]}; got {[list(d) for d in declared]}",
            )

    def _adapter_op(
        self, request: AdapterRequest, owner: str, tensors: list[torch.Tensor]
    ) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        if request.op == "create":
            adapter = self._create_adapter(request, owner, tensors)
            return {"start": adapter.start, "end": adapter.end, "numel": adapter.weights.numel()}, ()
        adapter = self.adapters.get(request.adapter_id, owner)
        if request.op == "set":
            adapter.weights = self._adapter_weights(tensors, tuple(adapter.weights.shape))
            return {}, ()
        if request.op == "get":
            return {}, (adapter.weights.float().cpu(),)
        self.adapters.delete(request.adapter_id, owner)
        return {}, ()

    def _create_adapter(self, request: AdapterRequest, owner: str, tensors: list[torch.Tensor]) -> Adapter:
        self._check_accepting()
        self._check_span(request.start, request.end)
        if self.tickets is not None:  # memory is held for a job: only a job's ticket may claim it
            self.tickets.check(request.ticket, request.start, request.end)
        try:
            spec = LoraSpec(request.rank, request.alpha, request.targets)
        except ValueError as e:
            raise RequestError(codes.BAD_REQUEST, str(e)) from None
        shape = (request.end - request.start, block_numel(spec, self.backend.lora_shapes))
        # Check the budget before building anything.
        self.adapters.check_new(request.adapter_id, spec, shape[0] * shape[1] * self.backend.dtype.itemsize)
        if request.seed is not None and not tensors:
            weights = init_weights(spec, self.backend.lora_shapes, request.seed, request.start, request.end)
            weights = weights.to(self.backend.device, self.backend.dtype)
        elif request.seed is None:
            weights = self._adapter_weights(tensors, shape)
        else:
            raise RequestError(codes.BAD_REQUEST, "send either a seed or the weights, not both")
        adapter = Adapter(request.adapter_id, owner, request.start, request.end, spec, weights)
        self.adapters.add(adapter)
        return adapter

    def _adapter_weights(self, tensors: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        if len(tensors) != 1:
            raise RequestError(codes.BAD_REQUEST, "expected one tensor: the adapter weights")
        (weights,) = tensors
        if tuple(weights.shape) != shape or not weights.is_floating_point():
            raise RequestError(
                codes.BAD_SHAPE,
                f"adapter weights must be a floating-point tensor of shape {list(shape)}; "
                f"got {weights.dtype} {list(weights.shape)}",
            )
        if not torch.isfinite(weights).all():
            raise RequestError(codes.BAD_VALUE, "adapter weights contain NaN or infinite values")
        # A fresh tensor, never an in-place copy: a request computing now keeps the old weights.
        return weights.to(self.backend.device, self.backend.dtype)

    async def _expire_adapters(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.config.adapter_ttl, self.config.graph_ttl))
            for adapter_id in self.adapters.expire():
                logger.info(f"forgot adapter {adapter_id} (unused for {self.config.adapter_ttl:.0f} s)")
            self.graphs.expire()

    # --- inference sessions ---------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise RequestError(codes.NOT_ACCEPTING, "this provider is shutting down or moving; use another")

    def _open_session(self, spec: OpenSession, client: asyncio.StreamWriter, peer: str) -> Session:
        self._check_accepting()
        self._check_span(spec.start, spec.end)
        ticket = None if self.tickets is None else self.tickets.check(spec.ticket, spec.start, spec.end)
        if spec.session_id in self.sessions:
            raise RequestError(codes.SESSION_EXISTS, f"session {spec.session_id} is already open here")
        if spec.max_length > self.config.max_session_length:
            raise RequestError(
                codes.TOO_LONG,
                f"max_length {spec.max_length} exceeds this provider's limit of "
                f"{self.config.max_session_length} tokens",
            )
        if spec.batch_size > self.config.max_batch_size:
            raise RequestError(
                codes.TOO_LARGE,
                f"batch {spec.batch_size} exceeds this provider's limit of {self.config.max_batch_size}",
            )
        if len(self.sessions) >= self.config.max_sessions:
            raise RequestError(codes.BUSY, f"this provider already serves {len(self.sessions)} sessions; try another")
        length = spec.max_length if ticket is None else self._paid_length(ticket, spec)
        needed = self.backend.cache_bytes(
            num_layers=spec.end - spec.start, batch_size=spec.batch_size, max_length=length
        )
        if needed > self.cache_bytes_left:
            raise RequestError(
                codes.CACHE_FULL,
                f"the session needs {needed} bytes of cache, {self.cache_bytes_left} "
                f"are free; ask for a shorter max_length or another provider",
            )
        self.quotas.check_session(peer, needed)
        cache = self.backend.new_cache(start=spec.start, end=spec.end, batch_size=spec.batch_size, max_length=length)
        session = Session(spec=spec, cache=cache, reserved_bytes=needed, client=client, ticket=ticket, peer=peer)
        self._reserved_bytes += needed
        self.quotas.add_session(peer, needed)
        self.sessions[spec.session_id] = session
        if spec.next_session is not None:
            self._by_next_session[spec.next_session] = session
        return session

    def _paid_length(self, ticket: JobTicket, spec: OpenSession) -> int:
        """Tokens of cache a session may reserve on ``ticket``: opening charges nothing, so the
        reservation is bounded by what the ticket's unused units can pay to fill (a ticket
        worth a few units cannot hold a large cache); at most ``max_length``."""
        per_token = work_units(tokens=spec.batch_size, blocks=spec.end - spec.start)
        affordable = (ticket.max_units - self.tickets.units_used(ticket.ticket_id)) // per_token
        if affordable < 1:
            raise TicketError(
                f"ticket {ticket.ticket_id} has too few work units left to pay for one token of a "
                f"session of batch {spec.batch_size} over {spec.end - spec.start} blocks",
                code=codes.TICKET_EXHAUSTED,
            )
        return min(spec.max_length, affordable)

    def _close_session(self, session: Session) -> None:
        if self.sessions.pop(session.spec.session_id, None) is session:
            self._reserved_bytes -= session.reserved_bytes
            self.quotas.remove_session(session.peer, session.reserved_bytes)
            if session.spec.next_session is not None:
                self._by_next_session.pop(session.spec.next_session, None)

    async def _handle_inference(
        self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await self._first_head(reader, self._no_tensors)
        spec = OpenSession.from_header(head.header)
        try:
            session = self._open_session(spec, writer, str(stream_info.peer_id))
        except (RequestError, TicketError) as e:
            await write_message(writer, error_header(e.code, str(e)))
            return
        try:
            await write_message(
                writer, {"type": "opened", "session_id": spec.session_id, "cache_tokens_left": self.cache_tokens_left}
            )
            while True:
                lease = self.quotas.lease(session.peer)
                try:
                    message = await read_message(reader, self._limits, lease)
                except asyncio.IncompleteReadError:
                    lease.release()
                    return  # the client closed the session
                try:
                    if message.header.get("type") == "close":
                        if session.ticket is not None:  # a clean close: the final receipt, and the client's ack of it
                            await self._send_receipt(session, final=True)
                            await self._await_ack(session, reader)
                        return
                    if await self._session_message(session, message, writer):
                        return
                finally:
                    lease.release()
        finally:
            self._close_session(session)
            if session.ticket is not None:
                await self._send_receipt(session, final=True)

    async def _session_message(self, session: Session, message: Message, writer: asyncio.StreamWriter) -> bool:
        """Handle one message on an open session's stream; True when it ends the session."""
        kind = message.header.get("type")
        if kind == "relink":
            await self._relink(session, message.header, writer)
            return False
        if kind == "ack":
            await self._acknowledge(session, message.header)
            return False
        try:
            step = Step.from_header(message.header)
        except ProtocolError as e:  # a bad header spoils one step, not the session
            await write_message(writer, error_header(e.code, str(e), step_id=message.header.get("step_id")))
            return False
        if step.session_id != session.spec.session_id:
            await write_message(
                writer,
                error_header(
                    codes.UNKNOWN_SESSION,
                    f"this stream serves session {session.spec.session_id}, not {step.session_id}",
                    step_id=step.step_id,
                ),
            )
            return False
        await self._apply_step(session, step, message.tensors)
        return False

    async def _send_receipt(self, session: Session, *, final: bool = False) -> None:
        """Sign the session's totals and send them on its stream (kept for upload either way)."""
        ticket, session_id = session.ticket, session.spec.session_id
        receipt = self.tickets.final_receipt(ticket, session_id) if final else self.tickets.receipt(ticket, session_id)
        if receipt is not None:
            await self._try_send(session.client, {"type": "receipt", "receipt": receipt.to_dict()})

    async def _await_ack(self, session: Session, reader: asyncio.StreamReader) -> None:
        """After a closing session's final receipt, read the client's acks for a moment (else
        the session's last steps would count against the ticket's credit window for good)."""
        try:
            async with asyncio.timeout(_CLOSE_ACK_TIMEOUT_S):
                while True:
                    message = await read_message(reader, self._no_tensors)
                    if message.header.get("type") == "ack":
                        await self._acknowledge(session, message.header)
                        return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            return

    async def _acknowledge(self, session: Session, header: dict[str, Any]) -> None:
        """The client countersigned a receipt of this session (the payment channel)."""
        try:
            ack = receipt_ack(header)
            if session.ticket is None or ack is None:
                raise RequestError(
                    codes.BAD_ACK,
                    "this session is not billed"
                    if session.ticket is None
                    else "an ack message carries 'ack': the countersigned receipt",
                )
            self.tickets.acknowledge(session.ticket, ack)
        except (ProtocolError, RequestError) as e:
            await self._try_send(session.client, error_header(getattr(e, "code", codes.BAD_ACK), str(e)))

    async def _relink(self, session: Session, header: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        try:
            relink = Relink.from_header(header)
        except ProtocolError as e:
            await write_message(writer, error_header(e.code, str(e)))
            return
        if relink.session_id != session.spec.session_id:
            await write_message(
                writer, error_header(codes.UNKNOWN_SESSION, f"this stream serves session {session.spec.session_id}")
            )
            return
        async with session.lock:  # never re-wire in the middle of a step
            spec = session.spec
            if spec.next_session is not None:
                self._by_next_session.pop(spec.next_session, None)
            changes: dict[str, Any] = {}
            if relink.prev_peer is not None:
                changes["prev_peer"] = relink.prev_peer
            if relink.next_peer is not None:
                changes.update(next_peer=relink.next_peer, next_session=relink.next_session)
            elif relink.clear_next:
                changes.update(next_peer=None, next_session=None)
            session.spec = dataclasses.replace(spec, **changes)
            if session.spec.next_session is not None:
                self._by_next_session[session.spec.next_session] = session
        await write_message(writer, {"type": "relinked", "session_id": spec.session_id})

    async def _apply_step(
        self,
        session: Session,
        step: Step,
        tensors: list[torch.Tensor],
        *,
        input_record: StepRecord | None = None,
        input_digest: str | None = None,
    ) -> None:
        """Run one step of a session and deliver its output; errors go to the session's client.
        ``input_record``: the pusher's record of the input (checked), ``input_digest`` its digest."""
        async with session.lock:
            try:
                delivered = await self._compute_step(session, step, tensors, input_record, input_digest)
            except (RequestError, TicketError) as e:
                await self._try_send(session.client, error_header(e.code, str(e), step_id=step.step_id))
                return
            if delivered is None:
                return
            spec = session.spec
            if spec.next_peer is not None:
                await self._push(session, step, delivered)
            if spec.return_outputs or spec.next_peer is None:
                await self._try_send(session.client, delivered.header(), (delivered.output,))
            if session.ticket is not None and self.tickets.receipt_due(session.ticket, spec.session_id):
                await self._send_receipt(session)

    async def _compute_step(
        self,
        session: Session,
        step: Step,
        tensors: list[torch.Tensor],
        input_record: StepRecord | None,
        input_digest: str | None,
    ) -> _Delivered | None:
        spec = session.spec
        session.last_used = time.monotonic()
        if step.step_id in session.recent_steps:
            # Delivered twice (pushed and re-sent): apply once; answer again if it was the last.
            last = session.last_output
            if last is not None and last.step_id == step.step_id and spec.return_outputs:
                await self._try_send(session.client, last.header(), (last.output,))
            return None
        if step.step_id <= session.last_step_id:
            # Computing it again could sign a second, different record for the same step id.
            raise RequestError(
                codes.STALE_STEP,
                f"step {step.step_id} is older than step {session.last_step_id}, "
                f"the last this session computed; give each step a new, higher id",
            )
        if len(tensors) != 1:
            raise RequestError(codes.BAD_REQUEST, "a step carries exactly one tensor: hidden states")
        (hidden,) = tensors
        self._check_hidden(hidden, "hidden states", batch_size=spec.batch_size)
        if step.position > session.cache.length:
            raise RequestError(
                codes.BAD_POSITION,
                f"step starts at position {step.position} but the session holds "
                f"{session.cache.length} tokens; positions cannot be skipped",
            )
        if step.position + hidden.shape[1] > spec.max_length:
            raise RequestError(
                codes.TOO_LONG,
                f"positions {step.position}..{step.position + hidden.shape[1]} exceed "
                f"the session's max_length of {spec.max_length}",
            )
        if step.position + hidden.shape[1] > session.cache.max_length:  # the ticket paid for a shorter cache
            raise TicketError(
                f"ticket {session.ticket.ticket_id} pays for {session.cache.max_length} tokens of this "
                f"session; positions {step.position}..{step.position + hidden.shape[1]} exceed them",
                code=codes.TICKET_EXHAUSTED,
            )
        charge = (
            None
            if session.ticket is None
            else self.tickets.charge(
                session.ticket, spec.session_id, tokens=hidden.shape[0] * hidden.shape[1], blocks=spec.end - spec.start
            )
        )
        try:
            output = await self._run_compute(
                lambda: self.backend.inference_step(session.cache, hidden, step.position, spec.start, spec.end),
                hidden.shape[0] * hidden.shape[1],
            )
        except BaseException:
            if charge is not None:
                charge.cancel()
            raise
        digests = await self._run_compute(
            lambda: (input_digest or digest_hex(hidden), outputs_digest((output,))), hidden.shape[0] * hidden.shape[1]
        )
        if charge is not None:
            charge.commit_digest(digests[1])
        session.recent_steps[step.step_id] = None
        while len(session.recent_steps) > _RECENT_STEPS:
            session.recent_steps.popitem(last=False)
        session.last_step_id = step.step_id
        record = sign_step(
            self.identity,
            session_id=spec.session_id,
            instance=session.instance,
            step_id=step.step_id,
            position=step.position,
            input_digest=digests[0],
            output_digest=digests[1].hex(),
            ticket_id="" if session.ticket is None else session.ticket.ticket_id,
        )
        session.last_output = _Delivered(step.step_id, step.position, output, record, input_record)
        return session.last_output

    # --- pushes between providers -----------------------------------------------------------------

    async def _push(self, session: Session, step: Step, delivered: _Delivered) -> None:
        spec = session.spec
        header = Step(session_id=spec.next_session, step_id=step.step_id, position=step.position).to_header()
        header["record"] = delivered.record.to_dict()  # the same record the client gets with the output
        try:
            writer = await self._push_link(spec.next_peer)
            await write_message(writer, header, (delivered.output,))
        except Exception as e:
            self._push_links.pop(spec.next_peer, None)
            logger.info(f"push to {spec.next_peer} failed: {e!r}")
            await self._try_send(
                session.client,
                error_header(
                    codes.NEXT_HOP_FAILED,
                    f"could not push to the next provider {spec.next_peer}: {e!r}",
                    step_id=step.step_id,
                    peer_id=spec.next_peer,
                ),
            )

    async def _push_link(self, peer_id: str) -> asyncio.StreamWriter:
        writer = self._push_links.get(peer_id)
        if writer is not None and not writer.is_closing():
            return writer
        async with self._push_link_lock:
            writer = self._push_links.get(peer_id)
            if writer is None or writer.is_closing():
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), RPC_PUSH)
                self._push_links[peer_id] = writer
                self._spawn(self._read_push_replies(peer_id, reader, writer))
            return writer

    async def _read_push_replies(
        self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay errors the next provider reports about our pushes to the client concerned."""
        try:
            while True:
                message = await read_message(reader, Limits(max_tensors=0))
                error = ErrorReply.from_header(message.header)  # a push is answered with errors only
                session = self._by_next_session.get(str(error.session_id))
                if session is not None:
                    await self._try_send(
                        session.client,
                        error_header(
                            codes.NEXT_HOP_FAILED,
                            f"the next provider {peer_id} refused a step: {error.code}: {error.message}",
                            step_id=error.step_id,
                            peer_id=peer_id,
                        ),
                    )
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            pass
        finally:
            if self._push_links.get(peer_id) is writer:
                del self._push_links[peer_id]

    async def _handle_push(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(stream_info.peer_id)
        first = True
        while True:
            lease = self.quotas.lease(sender)
            try:
                # A push link is opened when there is a step to push: its first one comes at once.
                head = await (self._first_head(reader, self._limits) if first else read_head(reader, self._limits))
                first = False
                message = Message(head.header, await read_tensors(reader, head, self._limits, lease))
                await self._push_step(sender, message, writer)
            except asyncio.IncompleteReadError:
                return
            finally:
                lease.release()

    async def _push_step(self, sender: str, message: Message, writer: asyncio.StreamWriter) -> None:
        """Apply one step a previous provider pushed, after checking the pusher's signed record
        of it (or tell the pusher the session is unknown)."""
        step = Step.from_header(message.header)
        session = self.sessions.get(step.session_id)
        if session is None or session.spec.prev_peer != sender:
            # Same answer for both cases: do not reveal which sessions exist to other peers.
            await write_message(
                writer,
                error_header(
                    codes.UNKNOWN_SESSION,
                    f"no session {step.session_id} expects steps from {sender}",
                    session_id=step.session_id,
                    step_id=step.step_id,
                ),
            )
            return
        try:
            record, digest = await self._check_push_record(sender, step, message)
        except StepRecordError as e:
            # Told to the client, not answered to the pusher: the pusher would relay it as
            # our failure, and an honest pusher never sends a bad record.
            logger.info(f"refused a push from {sender}: {e}")
            await self._try_send(
                session.client,
                error_header(
                    codes.BAD_PUSH,
                    f"the previous provider {sender} pushed step {step.step_id} without a valid step record: {e}",
                    step_id=step.step_id,
                    peer_id=sender,
                ),
            )
            return
        await self._apply_step(session, step, message.tensors, input_record=record, input_digest=digest)

    async def _check_push_record(
        self, sender: str, step: Step, message: Message
    ) -> tuple[StepRecord | None, str | None]:
        """The pusher's signed record of the pushed tensor, and the tensor's digest; raises
        StepRecordError unless ``sender`` signed it for this step and this very tensor. A
        message without exactly one tensor is left to the step's own checks (None, None)."""
        if len(message.tensors) != 1:
            return None, None
        (tensor,) = message.tensors
        record = StepRecord.from_dict(message.header.get("record"))
        digest = await self._run_compute(lambda: digest_hex(tensor), tensor.numel() // max(tensor.shape[-1], 1))
        record.check_about(peer=sender, step_id=step.step_id, position=step.position, output_digest=digest)
        return record.verify(), digest

    async def _expire_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.config.session_idle_timeout))
            deadline = time.monotonic() - self.config.session_idle_timeout
            for session in list(self.sessions.values()):
                if session.last_used < deadline:
                    logger.info(f"closing idle session {session.spec.session_id}")
                    self._close_session(session)
                    session.client.close()
