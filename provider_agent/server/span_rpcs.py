"""Forward and backward: one request, one reply, checked and charged on its ticket before a
tensor byte is read, computed (a training forward keeps its graph for the backward), replied."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch

from hivemart_core.models.adapters import AdapterError
from hivemart_core.models.backend import LoraWeights
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.framing import Head, read_tensors, write_message
from hivemart_core.protocol.rpc import SpanRequest, error_header
from hivemart_core.protocol.tickets import JobTicket, TicketError
from provider_agent.limits import BufferLease, RequestError
from provider_agent.metering import Charge, outputs_digest
from provider_agent.server.checks import RequestChecks


class SpanRPCs(RequestChecks):
    """The ``forward`` and ``backward`` RPCs."""

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
