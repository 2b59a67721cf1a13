"""LoRA adapters of fine-tuning jobs: create, set, get and delete an owner's adapter weights,
within the adapter memory budget, and forget adapters left unused."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from hivemind.utils.logging import get_logger

from hivemart_core.models.adapters import Adapter, AdapterError
from hivemart_core.models.lora import LoraSpec, block_numel, init_weights
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.framing import Head, read_tensors, write_message
from hivemart_core.protocol.rpc import AdapterRequest, error_header
from hivemart_core.protocol.tickets import TicketError
from provider_agent.limits import RequestError
from provider_agent.server.checks import RequestChecks

logger = get_logger(__name__)


class AdapterRPCs(RequestChecks):
    """The ``adapter`` RPC and the expiry of unused adapters and kept graphs."""

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
