"""Talking to one provider: info, forward, backward, and inference streams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from hivemind.p2p import P2P, PeerID

from client_sdk.errors import ProtocolError, ProviderUnavailableError, RemoteError
from client_sdk.protocol.framing import Limits, Message, read_message, write_message
from client_sdk.protocol.rpc import (
    RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, RPC_INFO, OpenSession, Relink, SpanRequest, Step,
)

__all__ = ["ProviderConnection", "InferenceStream"]

_CLIENT_LIMITS = Limits(max_tensors=4, max_tensor_bytes=2**32)


def _raise_if_error(message: Message, peer_id: str) -> Message:
    header = message.header
    if header.get("type") == "error":
        raise RemoteError(str(header.get("code")), str(header.get("message")), peer_id=peer_id,
                          extra={k: v for k, v in header.items() if k not in ("type", "code", "message")})
    return message


class ProviderConnection:
    """RPCs to one provider over the client's p2p daemon."""

    def __init__(self, p2p: P2P, peer_id: str) -> None:
        self.p2p, self.peer_id = p2p, peer_id
        self._peer = PeerID.from_base58(peer_id)

    async def _open(self, rpc: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(self._peer, rpc)
        except Exception as e:  # p2pd reports unreachable peers with several exception types
            raise ProviderUnavailableError(self.peer_id, f"cannot open {rpc}: {e}") from e
        return reader, writer

    async def call(self, rpc: str, header: dict[str, Any], tensors: Sequence[torch.Tensor] = (),
                   timeout: float | None = None) -> Message:
        """One request, one response, on a fresh stream."""
        reader, writer = await self._open(rpc)
        try:
            try:
                await write_message(writer, header, tensors)
            except ConnectionError:
                # The provider may have refused the request before reading all of it (too large,
                # say) and closed its end: its answer is still worth reading.
                timeout = 5.0
            reply = await asyncio.wait_for(read_message(reader, _CLIENT_LIMITS), timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ProviderUnavailableError(self.peer_id, f"{rpc} stream broke: {e!r}") from e
        except asyncio.TimeoutError as e:
            raise ProviderUnavailableError(self.peer_id, f"no answer to {rpc} within {timeout} s") from e
        finally:
            writer.close()
        return _raise_if_error(reply, self.peer_id)

    async def info(self, timeout: float | None = 10.0) -> dict[str, Any]:
        return (await self.call(RPC_INFO, {}, timeout=timeout)).header

    async def forward(self, start: int, end: int, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        reply = await self.call(RPC_FORWARD, SpanRequest(start, end).to_header(), (hidden,), timeout)
        return self._single_tensor(reply, hidden.shape)

    async def backward(self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor,
                       timeout: float | None = None) -> torch.Tensor:
        reply = await self.call(RPC_BACKWARD, SpanRequest(start, end).to_header(), (hidden, grad_output), timeout)
        return self._single_tensor(reply, hidden.shape)

    def _single_tensor(self, reply: Message, shape: torch.Size) -> torch.Tensor:
        if len(reply.tensors) != 1 or reply.tensors[0].shape != shape:
            raise ProtocolError(f"provider {self.peer_id} answered with tensors "
                                f"{[list(t.shape) for t in reply.tensors]}, expected one of {list(shape)}")
        return reply.tensors[0]

    async def open_inference(self, spec: OpenSession, inbox: asyncio.Queue,
                             timeout: float | None = 10.0) -> "InferenceStream":
        """Open an inference session; its replies are put on ``inbox`` as ``(stream, message)``."""
        reader, writer = await self._open(RPC_INFERENCE)
        try:
            await write_message(writer, spec.to_header())
            reply = await asyncio.wait_for(read_message(reader, _CLIENT_LIMITS), timeout)
            _raise_if_error(reply, self.peer_id)
        except BaseException as e:
            writer.close()
            if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):
                raise ProviderUnavailableError(self.peer_id, f"inference stream broke while opening: {e!r}") from e
            raise
        return InferenceStream(self.peer_id, spec, reader, writer, inbox)


@dataclass(eq=False)
class InferenceStream:
    """An open inference session on one provider. A reader task forwards every reply to
    the chain's shared inbox; a broken stream shows up there as a ``None`` message."""

    peer_id: str
    spec: OpenSession
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    inbox: asyncio.Queue

    def __post_init__(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_replies())

    async def _read_replies(self) -> None:
        try:
            while True:
                message = await read_message(self.reader, _CLIENT_LIMITS)
                self.inbox.put_nowait((self, message))
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            self.inbox.put_nowait((self, e))

    async def send_step(self, step_id: int, position: int, hidden: torch.Tensor) -> None:
        await self._send(Step(self.spec.session_id, step_id, position).to_header(), (hidden,))

    async def send_relink(self, relink: Relink) -> None:
        await self._send(relink.to_header())

    async def _send(self, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
        try:
            await write_message(self.writer, header, tensors)
        except (ConnectionError, RuntimeError) as e:
            raise ProviderUnavailableError(self.peer_id, f"inference stream broke: {e!r}") from e

    def close(self) -> None:
        self._reader_task.cancel()
        self.writer.close()
