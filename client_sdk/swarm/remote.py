"""Autograd through remote blocks, for batches, with failover; deep prompts and LoRA adapters.

:class:`RemoteBlocks` runs hidden states ``[batch, tokens, hidden]`` through a chain of
providers covering every block, differentiably:

- The batch is cut into chunks of at most ``max_chunk_tokens`` tokens; chunks go through the
  chain concurrently (while one provider computes chunk 2, the next one computes chunk 1).
- Forward calls each hop's ``rpc_forward`` and keeps the hidden states that entered each
  hop; backward calls each hop's ``rpc_backward`` in reverse with that input. When a
  backward will follow, the forward asks the provider to keep its autograd graph under a
  random ``graph_id`` so that the backward need not recompute it; a provider that dropped
  the graph (memory budget, timeout, restart) recomputes the forward from the input sent.
- When a provider fails (its stream breaks, it answers a retryable error, it misses the
  deadline), the client bans it and routes its blocks to replacements. In forward the rest
  of the chain is re-routed from the failed hop's input. In backward the recorded input of
  the failed span is run through the replacement chain: forwards through all but its last
  hop give their inputs, then backwards go through the replacements in reverse (each
  provider's backward recomputes its own forward). Gradients of a span count only once all
  of its replacement hops answered, so a failed attempt never adds partial gradients.
- Deep prompts ``[blocks, batch or 1, prefix, hidden]`` go with every request (each hop gets
  its blocks' rows) and their gradients come back from ``rpc_backward``.
- A :class:`RemoteLora` adapter: the client holds the master weights and the optimizer; each
  provider holds a copy of its span's weights under an adapter id (created from the seed, or
  uploaded), refreshed whenever the master changed since the last upload, and returns the
  weight gradients with ``rpc_backward``. A replacement provider simply gets the current
  weights uploaded, so failover never changes what a step computes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.utils.logging import get_logger

from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.routing import RouteHop
from hivemart_core.errors import (
    NoProvidersError,
    ProtocolError,
    ProviderUnavailableError,
    RemoteError,
    StreamBrokenError,
    SwarmError,
)
from hivemart_core.models.lora import LoraSpec, block_numel, init_weights
from hivemart_core.protocol.error_codes import Retry, retry_for
from hivemart_core.protocol.framing import Message
from hivemart_core.protocol.rpc import RPC_ADAPTER, RPC_BACKWARD, RPC_FORWARD, AdapterRequest, SpanRequest, SpanTuning
from hivemart_core.swarm.connection import ProviderConnection, SpanBilling
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["RemoteBlocks", "RemoteLora"]

logger = get_logger(__name__)

FindRoute = Callable[[int, int, frozenset[str]], Awaitable[list[RouteHop]]]


class RemoteLora:
    """A LoRA adapter over all blocks of a model whose master weights the client holds.

    ``weights`` is a ``[num_blocks, per_block]`` float32 parameter (layout in
    :mod:`hivemart_core.models.lora`); train it with any torch optimizer. Providers get
    copies of their spans' rows, created from ``seed`` while the master is untouched and
    uploaded otherwise, and re-uploaded after every change of the master.
    """

    def __init__(
        self,
        spec: LoraSpec,
        shapes: Mapping[str, tuple[int, int]],
        num_blocks: int,
        *,
        seed: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.spec, self.shapes, self.num_blocks, self.seed = spec, dict(shapes), num_blocks, seed
        self.per_block = block_numel(spec, shapes)
        initial = init_weights(spec, shapes, seed, 0, num_blocks) if weights is None else weights.float().clone()
        if tuple(initial.shape) != (num_blocks, self.per_block):
            raise ValueError(
                f"adapter weights must have shape [{num_blocks}, {self.per_block}], got {list(initial.shape)}"
            )
        self.weights = torch.nn.Parameter(initial)
        self._pristine_version = self.weights._version if weights is None else -1
        # (peer_id, start, end) -> (adapter id, master version the provider holds)
        self._placed: dict[tuple[str, int, int], tuple[str, int]] = {}
        self._locks: dict[tuple[str, int, int], asyncio.Lock] = {}

    @property
    def version(self) -> int:
        """Changes whenever the master weights change in place (an optimizer step)."""
        return self.weights._version

    def placements(self) -> dict[tuple[str, int, int], str]:
        """Adapter ids by (peer id, start, end) of the providers holding a copy."""
        return {key: adapter_id for key, (adapter_id, _) in self._placed.items()}

    def forget(self, peer_id: str, start: int, end: int) -> None:
        self._placed.pop((peer_id, start, end), None)

    async def ensure(
        self,
        connection: ProviderConnection,
        start: int,
        end: int,
        timeout: float | None,
        *,
        ticket: dict[str, Any] | None = None,
    ) -> str:
        """Make sure the provider holds the current weights of blocks [start, end); its adapter id.
        ``ticket`` claims the adapter memory for a job (default: the connection's billing ticket)."""
        key = (connection.peer_id, start, end)
        async with self._locks.setdefault(key, asyncio.Lock()):
            version = self.version
            placed = self._placed.get(key)
            rows = self.weights.detach()[start:end].contiguous()
            if placed is None:
                adapter_id = secrets.token_urlsafe(12)
                if ticket is None and connection.billing is not None:
                    ticket = connection.billing.ticket.to_dict()
                request = AdapterRequest(
                    "create",
                    adapter_id,
                    start,
                    end,
                    self.spec.rank,
                    self.spec.alpha,
                    self.spec.targets,
                    self.seed if version == self._pristine_version else None,
                    ticket=ticket,
                )
                await connection.call(
                    RPC_ADAPTER, request.to_header(), () if request.seed is not None else (rows,), timeout
                )
            elif placed[1] != version:
                adapter_id = placed[0]
                await connection.call(RPC_ADAPTER, AdapterRequest("set", adapter_id).to_header(), (rows,), timeout)
            else:
                return placed[0]
            self._placed[key] = (adapter_id, version)
            return adapter_id

    async def release(self, p2p: Any, timeout: float = 10.0) -> None:
        """Delete every copy on the providers (best effort: unreachable ones expire it)."""

        async def delete(key: tuple[str, int, int], adapter_id: str) -> None:
            try:
                await ProviderConnection(p2p, key[0]).call(
                    RPC_ADAPTER, AdapterRequest("delete", adapter_id).to_header(), (), timeout
                )
            except (ProviderUnavailableError, RemoteError) as e:
                logger.info(f"could not delete adapter {adapter_id} on {key[0]}: {e}")

        placed, self._placed = self._placed, {}
        await asyncio.gather(*(delete(key, adapter_id) for key, (adapter_id, _) in placed.items()))


@dataclass
class _Grads:
    """Gradients accumulated over the chunks of one backward."""

    prompts: torch.Tensor | None
    lora: torch.Tensor | None


@dataclass
class _Chunk:
    rows: slice
    hidden: torch.Tensor
    prompts: torch.Tensor | None  # [blocks, rows or 1, prefix, hidden]
    keep: bool = False  # a backward will follow: ask providers to keep their graphs
    trace: list[tuple[RouteHop, torch.Tensor, str | None]] = field(default_factory=list)  # hops, inputs, graph ids


def _graph_id() -> str:
    return secrets.token_urlsafe(9)


class _SpanFailed(Exception):
    def __init__(self, peer_id: str, error: Exception) -> None:
        super().__init__(str(error))
        self.peer_id, self.error = peer_id, error


@dataclass
class RemoteBlocks:
    """Differentiable hidden states through blocks ``[0, num_blocks)`` of the swarm."""

    runtime: SwarmRuntime
    find_route: FindRoute
    num_blocks: int
    bans: PeerBans = field(default_factory=PeerBans)
    max_chunk_tokens: int = 4096
    timeout: float | None = 120.0
    max_failovers: int = 5
    # A stream that broke mid-request is retried this many times on the same provider (after
    # retry_delay_s, doubling) before the provider counts as failed: daemons drop streams now
    # and then, and a live provider must not be banned (and its job failed) for that.
    stream_retries: int = 2
    retry_delay_s: float = 0.2
    failovers: list[dict[str, Any]] = field(default_factory=list)  # what happened, for callers that report it
    # billing(hop, lane) -> the ticket and receipt session of a paid job's request (None: free);
    # lane tells concurrent chunks apart (see client_sdk.swarm.job.SwarmJob.span_billing).
    billing: Callable[[RouteHop, object], SpanBilling | None] | None = None

    def __call__(
        self, hidden: torch.Tensor, prompts: torch.Tensor | None = None, lora: RemoteLora | None = None
    ) -> torch.Tensor:
        """``hidden`` [batch, tokens, hidden] after every block; differentiable with respect to
        ``hidden``, the deep ``prompts`` [num_blocks, batch or 1, prefix, hidden] and
        ``lora.weights``."""
        if hidden.ndim != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise ValueError(f"hidden must have shape [batch, tokens, hidden], got {list(hidden.shape)}")
        if prompts is not None and (
            prompts.ndim != 4
            or prompts.shape[0] != self.num_blocks
            or prompts.shape[1] not in (1, hidden.shape[0])
            or not 1 <= prompts.shape[2] <= hidden.shape[1]
        ):
            raise ValueError(
                f"deep prompts must have shape [{self.num_blocks}, 1 or {hidden.shape[0]}, prefix, "
                f"{hidden.shape[2]}], got {list(prompts.shape)}"
            )
        weights = lora.weights if lora is not None else None
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, prompts, weights))
        # torch leaves Function.apply unannotated (untyped_calls_exclude misses it via a subclass).
        out: torch.Tensor = _RemoteBlocksFunction.apply(hidden, prompts, weights, self, lora, keep)  # type: ignore[no-untyped-call]
        return out

    # --- chunks ---------------------------------------------------------------------------------

    def _chunks(self, hidden: torch.Tensor, prompts: torch.Tensor | None, keep: bool = False) -> list[_Chunk]:
        rows = max(1, self.max_chunk_tokens // hidden.shape[1])
        chunks = []
        for begin in range(0, hidden.shape[0], rows):
            part = slice(begin, min(begin + rows, hidden.shape[0]))
            chunk_prompts = prompts if prompts is None or prompts.shape[1] == 1 else prompts[:, part]
            chunks.append(_Chunk(part, hidden[part], chunk_prompts, keep))
        return chunks

    async def forward_chunks(self, chunks: list[_Chunk], lora: RemoteLora | None) -> list[torch.Tensor]:
        return list(await asyncio.gather(*(self._forward_chunk(c, lora) for c in chunks)))

    async def backward_chunks(
        self, chunks: list[_Chunk], grad: torch.Tensor, lora: RemoteLora | None, grads: _Grads
    ) -> list[torch.Tensor]:
        return list(await asyncio.gather(*(self._backward_chunk(c, grad[c.rows], lora, grads) for c in chunks)))

    # --- one hop ----------------------------------------------------------------------------------

    def _hop_prompts(self, chunk: _Chunk, hop: RouteHop, dtype: torch.dtype) -> torch.Tensor | None:
        if chunk.prompts is None:
            return None
        return chunk.prompts[hop.start : hop.end].to(dtype).contiguous()

    async def _call(
        self,
        rpc: str,
        hop: RouteHop,
        chunk: _Chunk,
        tensors: tuple[torch.Tensor, ...],
        lora: RemoteLora | None,
        graph_id: str | None = None,
    ) -> Message:
        """One forward or backward on ``hop``, retried there when its stream broke; provider
        failures raise _SpanFailed."""
        delay = self.retry_delay_s
        for retry in range(self.stream_retries + 1):
            try:
                return await self._call_once(rpc, hop, chunk, tensors, lora, graph_id)
            except _SpanFailed as e:
                if not isinstance(e.error, StreamBrokenError) or retry == self.stream_retries:
                    raise
                logger.info(f"{rpc} to {hop.peer_id} broke ({e.error}); retrying there in {delay:.1f} s")
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _call_once(
        self,
        rpc: str,
        hop: RouteHop,
        chunk: _Chunk,
        tensors: tuple[torch.Tensor, ...],
        lora: RemoteLora | None,
        graph_id: str | None = None,
    ) -> Message:
        """One forward or backward on ``hop``; adapter placement and an expired adapter are
        handled here, provider failures raise _SpanFailed."""
        billing = self.billing(hop, chunk.rows.start) if self.billing is not None else None
        connection = ProviderConnection(self.runtime.p2p, hop.peer_id, billing=billing)
        dtype = getattr(torch, hop.record.dtype)
        prompts = self._hop_prompts(chunk, hop, dtype)
        for _ in range(2):  # a second try after the provider forgot our adapter
            try:
                adapter_id = None if lora is None else await lora.ensure(connection, hop.start, hop.end, self.timeout)
                lora_grads = lora is not None and lora.weights.requires_grad and chunk.keep
                tuning = (
                    SpanTuning(
                        prompts=prompts is not None, adapter_id=adapter_id, lora_grads=lora_grads, graph_id=graph_id
                    )
                    if prompts is not None or adapter_id is not None or graph_id is not None
                    else None
                )
                header = SpanRequest(hop.start, hop.end, tuning=tuning).to_header()
                sent = tensors + ((prompts,) if prompts is not None else ())
                return await connection.call(rpc, header, sent, self.timeout)
            except RemoteError as e:
                # Which codes are worth another try, and where: hivemart_core.protocol.error_codes.
                if retry_for(e.code) is Retry.SAME_PROVIDER and lora is not None:
                    lora.forget(hop.peer_id, hop.start, hop.end)
                    continue
                if retry_for(e.code) is Retry.OTHER_PROVIDER:
                    raise _SpanFailed(hop.peer_id, e) from e
                raise
            except ProviderUnavailableError as e:
                raise _SpanFailed(hop.peer_id, e) from e
        raise _SpanFailed(hop.peer_id, SwarmError(f"provider {hop.peer_id} keeps forgetting our adapter"))

    async def _hop_forward(
        self, hop: RouteHop, chunk: _Chunk, hidden: torch.Tensor, lora: RemoteLora | None, graph_id: str | None = None
    ) -> torch.Tensor:
        reply = await self._call(RPC_FORWARD, hop, chunk, (hidden,), lora, graph_id)
        if len(reply.tensors) != 1 or reply.tensors[0].shape != hidden.shape:
            raise ProtocolError(
                f"provider {hop.peer_id} answered a forward with tensors "
                f"{[list(t.shape) for t in reply.tensors]}, expected one of {list(hidden.shape)}"
            )
        return reply.tensors[0]

    async def _hop_backward(
        self,
        hop: RouteHop,
        chunk: _Chunk,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        lora: RemoteLora | None,
        graph_id: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        lora_grads = lora is not None and lora.weights.requires_grad and chunk.keep
        reply = await self._call(RPC_BACKWARD, hop, chunk, (hidden, grad.to(hidden.dtype).contiguous()), lora, graph_id)
        expected = [tuple(hidden.shape)]
        if chunk.prompts is not None:
            expected.append((hop.end - hop.start, *chunk.prompts.shape[1:]))
        if lora_grads and lora is not None:
            expected.append((hop.end - hop.start, lora.per_block))
        if [tuple(t.shape) for t in reply.tensors] != expected:
            raise ProtocolError(
                f"provider {hop.peer_id} answered a backward with tensors "
                f"{[list(t.shape) for t in reply.tensors]}, expected {expected}"
            )
        grad_prompts = reply.tensors[1] if chunk.prompts is not None else None
        return reply.tensors[0], grad_prompts, reply.tensors[-1] if lora_grads else None

    # --- failover -----------------------------------------------------------------------------------

    async def _replace(self, failure: _SpanFailed, start: int, end: int, attempts: int) -> list[RouteHop]:
        if attempts > self.max_failovers:
            raise SwarmError(
                f"blocks {start}:{end} failed {attempts} times in a row; last: {failure.error}"
            ) from failure.error
        duration = self.bans.failed(failure.peer_id)
        logger.info(
            f"provider {failure.peer_id} failed on blocks {start}:{end} ({failure.error}); "
            f"banned for {duration:.0f} s, re-routing"
        )
        try:
            route = await self.find_route(start, end, frozenset({failure.peer_id}))
        except SwarmError as e:  # no provider (NoProvidersError) or no plan (a job's JobPlanError) without it
            route = await self._same_provider_again(failure, start, end, attempts, e)
        self.failovers.append(
            {
                "peer_id": failure.peer_id,
                "blocks": [start, end],
                "reason": str(failure.error),
                "replacement": [h.peer_id for h in route],
            }
        )
        return route

    async def _same_provider_again(
        self, failure: _SpanFailed, start: int, end: int, attempts: int, error: SwarmError
    ) -> list[RouteHop]:
        """The last resort when nobody else serves the blocks: the provider that failed, if it
        is still announced and its failure was one it may recover from, after a pause. A job
        must not fail while a live provider serves its blocks; ``max_failovers`` bounds this."""
        if isinstance(failure.error, (ProviderUnavailableError, RemoteError)):
            await asyncio.sleep(min(self.retry_delay_s * 2**attempts, 5.0))
            self.bans.succeeded(failure.peer_id)  # lift our own ban: it is the only way on
            try:
                route = await self.find_route(start, end, frozenset())
            except SwarmError:
                pass  # gone from the swarm (or the plan) too: report the first error
            else:
                logger.info(f"no other provider serves blocks {start}:{end}; trying {failure.peer_id} again")
                return route
        if isinstance(error, NoProvidersError):
            raise SwarmError(
                f"provider {failure.peer_id} failed on blocks {start}:{end} ({failure.error}) and no "
                f"other provider can take them: {error}"
            ) from failure.error
        raise error  # a job's JobPlanError and the like, as they are

    async def _forward_chunk(self, chunk: _Chunk, lora: RemoteLora | None) -> torch.Tensor:
        route = await self.find_route(0, self.num_blocks, frozenset())
        hidden, attempts, index = chunk.hidden, 0, 0
        chunk.trace = []
        while index < len(route):
            hop = route[index]
            hop_input = hidden.to(getattr(torch, hop.record.dtype)).contiguous()
            graph_id = _graph_id() if chunk.keep else None
            try:
                hidden = await self._hop_forward(hop, chunk, hop_input, lora, graph_id)
            except _SpanFailed as e:
                attempts += 1
                route = route[:index] + await self._replace(e, hop.start, self.num_blocks, attempts)
                continue
            self.bans.succeeded(hop.peer_id)
            chunk.trace.append((hop, hop_input, graph_id))
            index += 1
        return hidden

    async def _backward_chunk(
        self, chunk: _Chunk, grad: torch.Tensor, lora: RemoteLora | None, grads: _Grads
    ) -> torch.Tensor:
        for hop, hop_input, graph_id in reversed(chunk.trace):
            grad = await self._backward_span(hop, hop_input, graph_id, grad, chunk, lora, grads)
        return grad

    async def _backward_span(
        self,
        hop: RouteHop,
        hop_input: torch.Tensor,
        graph_id: str | None,
        grad: torch.Tensor,
        chunk: _Chunk,
        lora: RemoteLora | None,
        grads: _Grads,
    ) -> torch.Tensor:
        """Backward through blocks [hop.start, hop.end) from the input recorded in forward,
        on ``hop`` or, after failures, on replacements."""
        hops: list[tuple[RouteHop, torch.Tensor, str | None]] | None = [(hop, hop_input, graph_id)]
        route, attempts = [hop], 0
        while True:
            try:
                if hops is None:
                    hops = await self._replay_forward(route, hop_input, chunk, lora)
                span_grad, found = grad, []
                for sub_hop, sub_input, sub_graph in reversed(hops):
                    span_grad, grad_prompts, grad_lora = await self._hop_backward(
                        sub_hop, chunk, sub_input, span_grad, lora, sub_graph
                    )
                    found.append((sub_hop, grad_prompts, grad_lora))
            except _SpanFailed as e:
                attempts += 1
                route = await self._replace(e, hop.start, hop.end, attempts)
                hops = None
                continue
            for sub_hop, grad_prompts, grad_lora in found:
                self.bans.succeeded(sub_hop.peer_id)
                self._accumulate(grads, chunk, sub_hop, grad_prompts, grad_lora)
            return span_grad

    async def _replay_forward(
        self, route: list[RouteHop], hidden: torch.Tensor, chunk: _Chunk, lora: RemoteLora | None
    ) -> list[tuple[RouteHop, torch.Tensor, str | None]]:
        """The inputs of each replacement hop: forwards through all but the last (whose backward
        recomputes its own forward), keeping their graphs for the backwards that follow."""
        hops: list[tuple[RouteHop, torch.Tensor, str | None]] = []
        for index, sub_hop in enumerate(route):
            sub_input = hidden.to(getattr(torch, sub_hop.record.dtype)).contiguous()
            last = index + 1 == len(route)
            graph_id = None if last else _graph_id()
            hops.append((sub_hop, sub_input, graph_id))
            if not last:
                hidden = await self._hop_forward(sub_hop, chunk, sub_input, lora, graph_id)
        return hops

    @staticmethod
    def _accumulate(
        grads: _Grads, chunk: _Chunk, hop: RouteHop, grad_prompts: torch.Tensor | None, grad_lora: torch.Tensor | None
    ) -> None:
        if grad_prompts is not None and grads.prompts is not None:
            target = grads.prompts[hop.start : hop.end]
            if grads.prompts.shape[1] == 1:
                target += grad_prompts.to(target.dtype)
            else:
                target[:, chunk.rows] += grad_prompts.to(target.dtype)
        if grad_lora is not None and grads.lora is not None:
            grads.lora[hop.start : hop.end] += grad_lora.to(grads.lora.dtype)


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        lora_weights: torch.Tensor | None,
        blocks: RemoteBlocks,
        lora: RemoteLora | None,
        keep: bool,
    ) -> torch.Tensor:
        chunks = blocks._chunks(hidden.detach(), None if prompts is None else prompts.detach(), keep)
        outputs = blocks.runtime.run(blocks.forward_chunks(chunks, lora))
        ctx.blocks, ctx.lora, ctx.chunks = blocks, lora, chunks
        ctx.input_dtype = hidden.dtype
        ctx.prompts_like = None if prompts is None else (prompts.shape, prompts.dtype)
        return torch.cat(outputs).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        blocks: RemoteBlocks = ctx.blocks
        lora: RemoteLora | None = ctx.lora
        grads = _Grads(
            prompts=None if ctx.prompts_like is None else torch.zeros(ctx.prompts_like[0], dtype=torch.float32),
            lora=None
            if lora is None or not lora.weights.requires_grad
            else torch.zeros_like(lora.weights, dtype=torch.float32),
        )
        parts = blocks.runtime.run(blocks.backward_chunks(ctx.chunks, grad_output.contiguous(), lora, grads))
        grad_prompts = None if grads.prompts is None else grads.prompts.to(ctx.prompts_like[1])
        grad_lora = None if grads.lora is None or lora is None else grads.lora.to(lora.weights.dtype)
        return torch.cat(parts).to(ctx.input_dtype), grad_prompts, grad_lora, None, None, None
