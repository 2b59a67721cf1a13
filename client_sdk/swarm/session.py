"""An inference session over a chain of providers.

In *push* mode (the default) the client sends each step to the first provider only; every
provider forwards its output to the next one and the last answers the client, so a token
costs one message per hop. In *round-trip* mode the client relays every hop itself; it is
kept for comparison (``hivemart bench inference`` reports both) and for peers that cannot
reach each other directly.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Sequence

import torch
from hivemind.p2p import P2P

from client_sdk.errors import ProtocolError, ProviderUnavailableError, RemoteError
from client_sdk.protocol.framing import Message
from client_sdk.protocol.rpc import OpenSession
from client_sdk.swarm.connection import InferenceStream, ProviderConnection
from client_sdk.swarm.routing import RouteHop

__all__ = ["ChainSession"]


def new_session_id() -> str:
    return secrets.token_urlsafe(12)


class ChainSession:
    """A KV-cached inference session across ``route``; use :meth:`open`, :meth:`step`,
    :meth:`close` on the swarm loop."""

    def __init__(self, p2p: P2P, route: Sequence[RouteHop], *, max_length: int, batch_size: int = 1,
                 push: bool = True, step_timeout: float | None = 60.0) -> None:
        self.p2p, self.route = p2p, list(route)
        self.max_length, self.batch_size, self.push = max_length, batch_size, push
        self.step_timeout = step_timeout
        self.position = 0  # tokens processed so far
        self._next_step_id = 0
        self._inbox: asyncio.Queue = asyncio.Queue()
        self.streams: list[InferenceStream] = []
        self.hop_dtypes = [getattr(torch, hop.record.dtype) for hop in self.route]

    async def open(self) -> None:
        session_ids = [new_session_id() for _ in self.route]
        my_peer = str(self.p2p.peer_id)
        specs = []
        for i, hop in enumerate(self.route):
            pushing = self.push and i + 1 < len(self.route)
            specs.append(OpenSession(
                session_id=session_ids[i], start=hop.start, end=hop.end, max_length=self.max_length,
                batch_size=self.batch_size,
                prev_peer=self.route[i - 1].peer_id if self.push and i > 0 else my_peer,
                next_peer=self.route[i + 1].peer_id if pushing else None,
                next_session=session_ids[i + 1] if pushing else None,
                return_outputs=not pushing,
            ))
        results = await asyncio.gather(
            *(ProviderConnection(self.p2p, hop.peer_id).open_inference(spec, self._inbox, i)
              for i, (hop, spec) in enumerate(zip(self.route, specs))),
            return_exceptions=True)
        self.streams = [r for r in results if isinstance(r, InferenceStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through the chain starting at ``position``
        (default: the end of what the session holds) and return the last span's output."""
        position = self.position if position is None else position
        step_id = self._next_step_id
        self._next_step_id += 1
        if self.push:
            await self.streams[0].send_step(step_id, position, hidden.to(self.hop_dtypes[0]))
            output = await self._await_output(len(self.streams) - 1, step_id)
        else:
            output = hidden
            for hop, stream in enumerate(self.streams):
                await stream.send_step(step_id, position, output.to(self.hop_dtypes[hop]))
                output = await self._await_output(hop, step_id)
        self.position = position + hidden.shape[1]
        return output

    async def _await_output(self, hop: int, step_id: int) -> torch.Tensor:
        while True:
            try:
                source, message = await asyncio.wait_for(self._inbox.get(), self.step_timeout)
            except asyncio.TimeoutError as e:
                raise ProviderUnavailableError(self.route[hop].peer_id,
                                               f"no output within {self.step_timeout} s") from e
            peer_id = self.route[source].peer_id
            if isinstance(message, BaseException):
                raise ProviderUnavailableError(peer_id, f"inference stream closed: {message!r}") from message
            header = message.header
            if header.get("type") == "error":
                raise RemoteError(str(header.get("code")), str(header.get("message")),
                                  peer_id=str(header.get("peer_id") or peer_id))
            if header.get("type") == "output" and source == hop and header.get("step_id") == step_id:
                return self._check_output(message, peer_id)

    def _check_output(self, message: Message, peer_id: str) -> torch.Tensor:
        if len(message.tensors) != 1 or message.tensors[0].ndim != 3 or message.tensors[0].shape[0] != self.batch_size:
            raise ProtocolError(f"provider {peer_id} sent a malformed step output")
        return message.tensors[0]

    async def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.streams = []
