"""Autograd through remote blocks: forward calls each hop's ``rpc_forward``, backward its
``rpc_backward`` in reverse order (providers recompute their forward; nothing is stored
server-side between the two)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from client_sdk.swarm.connection import ProviderConnection
from client_sdk.swarm.routing import RouteHop
from client_sdk.swarm.runtime import SwarmRuntime

__all__ = ["remote_sequential"]


async def _forward_chain(runtime: SwarmRuntime, route: Sequence[RouteHop],
                         hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = []
    for hop in route:
        hop_input = hidden.to(getattr(torch, hop.record.dtype))
        inputs.append(hop_input)
        hidden = await ProviderConnection(runtime.p2p, hop.peer_id).forward(hop.start, hop.end, hop_input)
    return hidden, inputs


async def _backward_chain(runtime: SwarmRuntime, route: Sequence[RouteHop], inputs: Sequence[torch.Tensor],
                          grad: torch.Tensor) -> torch.Tensor:
    for hop, hop_input in zip(reversed(route), reversed(inputs)):
        grad = await ProviderConnection(runtime.p2p, hop.peer_id).backward(
            hop.start, hop.end, hop_input, grad.to(hop_input.dtype))
    return grad


class _RemoteSequential(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, route: Sequence[RouteHop], runtime: SwarmRuntime) -> torch.Tensor:
        output, inputs = runtime.run(_forward_chain(runtime, route, hidden.detach()))
        ctx.route, ctx.runtime, ctx.inputs = route, runtime, inputs
        ctx.input_dtype = hidden.dtype
        return output.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = ctx.runtime.run(_backward_chain(ctx.runtime, ctx.route, ctx.inputs, grad_output.contiguous()))
        return grad.to(ctx.input_dtype), None, None


def remote_sequential(hidden: torch.Tensor, route: Sequence[RouteHop], runtime: SwarmRuntime) -> torch.Tensor:
    """``hidden`` [batch, tokens, hidden] through every hop of ``route``, differentiably."""
    return _RemoteSequential.apply(hidden, route, runtime)
