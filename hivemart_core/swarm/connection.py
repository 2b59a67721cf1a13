"""Talking to one provider: info, forward, backward, and inference streams.

Billing: a connection made with a :class:`SpanBilling` attaches the job's ticket and the
client's session id to every forward and backward, mirrors the work in the job's
:class:`~hivemart_core.swarm.receipts.ReceiptCollector` from the output it received, and hands
the receipt of the reply header to it for checking and countersigning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger

from hivemart_core.errors import ProtocolError, ProviderUnavailableError, RemoteError, StreamBrokenError
from hivemart_core.protocol.framing import Limits, Message, encode_message, read_message, write_message
from hivemart_core.protocol.receipts import work_units
from hivemart_core.protocol.rpc import (
    RPC_ADAPTER,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    AdapterReply,
    ErrorReply,
    GradReply,
    InfoReply,
    OpenedReply,
    OpenSession,
    OutputReply,
    Relink,
    SpanRequest,
    Step,
    StreamReply,
    parse_stream_reply,
)
from hivemart_core.protocol.tickets import JobTicket
from hivemart_core.swarm.receipts import ReceiptCollector

__all__ = ["ProviderConnection", "InferenceStream", "SpanBilling", "StreamMessage", "Reply"]

logger = get_logger(__name__)

_CLIENT_LIMITS = Limits(max_tensors=4, max_tensor_bytes=2**32)

# What an inference stream puts on its chain's inbox: a reply, or the error that broke the stream.
Reply = tuple["InferenceStream", "StreamMessage | BaseException"]


# How each one-request RPC's reply is parsed (a malformed one raises ProtocolError).
_REPLY_PARSERS: dict[str, Callable[[Any], object]] = {
    RPC_INFO: InfoReply.from_header,
    RPC_FORWARD: OutputReply.from_header,
    RPC_BACKWARD: GradReply.from_header,
    RPC_ADAPTER: AdapterReply.from_header,
}


def _raise_if_error(message: Message, peer_id: str) -> Message:
    """``message`` unless it is an error reply, which raises RemoteError (a malformed error
    reply: ProtocolError)."""
    if message.header.get("type") == "error":
        error = ErrorReply.from_header(message.header)
        raise RemoteError(error.code, error.message, peer_id=peer_id, extra=error.extra)
    return message


def _checked_reply(rpc: str, message: Message, peer_id: str) -> Message:
    """``message`` once its header parsed as ``rpc``'s reply type; raises RemoteError for an
    error reply and ProtocolError (naming the provider) for a malformed one."""
    _raise_if_error(message, peer_id)
    parse = _REPLY_PARSERS.get(rpc)
    if parse is not None:
        try:
            parse(message.header)
        except ProtocolError as e:
            raise ProtocolError(f"provider {peer_id} answered {rpc} with a malformed reply: {e}", code=e.code) from e
    return message


@dataclass
class SpanBilling:
    """What pays for a provider's forwards and backwards, and who checks their receipts.

    ``session_id`` names the client's run on this ticket (one cumulative receipt counts it);
    ``lost`` is called when a request fails after it may have been computed, because the
    provider may then have counted work whose output the client never saw: the caller must
    use a new session id from then on, or every later receipt would fail the chain check.
    ``verify(header, sent, reply)`` may spot-check a forward's output; it raises
    :class:`~hivemart_core.errors.ProviderUnavailableError` to make the caller fail over.
    """

    ticket: JobTicket
    session_id: str
    collector: ReceiptCollector
    lost: Callable[[], None] | None = None
    verify: Callable[[dict[str, Any], Sequence[torch.Tensor], Message], Awaitable[None]] | None = None

    def header(self) -> dict[str, Any]:
        header = {"ticket": self.ticket.to_dict(), "session_id": self.session_id}
        ack = self.collector.ack(self.ticket, self.session_id)
        if ack is not None:  # the payment channel: countersigned, so the provider goes on serving
            header["ack"] = ack
        return header

    def on_reply(self, rpc: str, header: dict[str, Any], sent: Sequence[torch.Tensor], reply: Message) -> None:
        """Mirror the provider's count (tokens x blocks, backward double; chain over the
        first output tensor) and check the receipt of the reply, if any."""
        hidden = sent[0]
        units = work_units(
            tokens=hidden.shape[0] * hidden.shape[1],
            blocks=int(header["end"]) - int(header["start"]),
            backward=rpc == RPC_BACKWARD,
        )
        self.collector.record(self.ticket, self.session_id, units, reply.tensors[0])
        parsed = GradReply.from_header(reply.header) if rpc == RPC_BACKWARD else OutputReply.from_header(reply.header)
        receipt = parsed.receipt
        if receipt is None:
            self.collector.missing_receipt(self.ticket, self.session_id)
        else:
            self.collector.receive(receipt, ticket=self.ticket, session_id=self.session_id)

    def on_failure(self) -> None:
        if self.lost is not None:
            self.lost()


class ProviderConnection:
    """RPCs to one provider over the client's p2p daemon (billed with ``billing`` when given)."""

    def __init__(self, p2p: P2P, peer_id: str, *, billing: SpanBilling | None = None) -> None:
        self.p2p, self.peer_id, self.billing = p2p, peer_id, billing
        self._peer = PeerID.from_base58(peer_id)

    async def _open(self, rpc: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(self._peer, rpc)
        except Exception as e:  # p2pd reports unreachable peers with several exception types
            raise ProviderUnavailableError(self.peer_id, f"cannot open {rpc}: {e}") from e
        return reader, writer

    async def call(
        self, rpc: str, header: dict[str, Any], tensors: Sequence[torch.Tensor] = (), timeout: float | None = None
    ) -> Message:
        """One request, one response, on a fresh stream; forwards and backwards are billed
        to the connection's ticket when it has one."""
        billing = self.billing if rpc in (RPC_FORWARD, RPC_BACKWARD) else None
        if billing is None:
            return await self._call(rpc, header, tensors, timeout)
        header = {**header, **billing.header()}
        try:
            reply = await self._call(rpc, header, tensors, timeout)
        except BaseException:
            billing.on_failure()
            raise
        if reply.tensors and tensors:
            billing.on_reply(rpc, header, tensors, reply)
            if rpc == RPC_FORWARD and billing.verify is not None:
                await billing.verify(header, tensors, reply)
        return reply

    async def _call(
        self, rpc: str, header: dict[str, Any], tensors: Sequence[torch.Tensor], timeout: float | None
    ) -> Message:
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
            raise StreamBrokenError(self.peer_id, f"{rpc} stream broke: {e!r}") from e
        except TimeoutError as e:
            raise ProviderUnavailableError(self.peer_id, f"no answer to {rpc} within {timeout} s") from e
        finally:
            writer.close()
        return _checked_reply(rpc, reply, self.peer_id)

    async def info(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The provider's info reply as a map (checked: see :meth:`info_reply`)."""
        return (await self.call(RPC_INFO, {}, timeout=timeout)).header

    async def info_reply(self, timeout: float | None = 10.0) -> InfoReply:
        """The provider's info; one of another protocol version raises ProtocolError
        ``unsupported_version`` saying which side to upgrade."""
        return InfoReply.from_header((await self.call(RPC_INFO, {}, timeout=timeout)).header)

    async def forward(self, start: int, end: int, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """Hidden states after blocks [start, end) (billed when the connection has a ticket)."""
        reply = await self.call(RPC_FORWARD, SpanRequest(start, end).to_header(), (hidden,), timeout)
        return self._single_tensor(reply, hidden.shape)

    async def backward(
        self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor, timeout: float | None = None
    ) -> torch.Tensor:
        reply = await self.call(RPC_BACKWARD, SpanRequest(start, end).to_header(), (hidden, grad_output), timeout)
        return self._single_tensor(reply, hidden.shape)

    def _single_tensor(self, reply: Message, shape: torch.Size) -> torch.Tensor:
        if len(reply.tensors) != 1 or reply.tensors[0].shape != shape:
            raise ProtocolError(
                f"provider {self.peer_id} answered with tensors "
                f"{[list(t.shape) for t in reply.tensors]}, expected one of {list(shape)}"
            )
        return reply.tensors[0]

    async def open_inference(
        self, spec: OpenSession, inbox: asyncio.Queue[Reply], timeout: float | None = 10.0
    ) -> InferenceStream:
        """Open an inference session; its replies are put on ``inbox`` as ``(stream, message)``.

        A provider that does not answer within ``timeout`` (reaching it included) is
        :class:`ProviderUnavailableError`, like one that cannot be reached at all.
        """
        writer: asyncio.StreamWriter | None = None

        async def handshake() -> asyncio.StreamReader:
            nonlocal writer
            reader, writer = await self._open(RPC_INFERENCE)
            await write_message(writer, spec.to_header())
            opened = OpenedReply.from_header(
                _raise_if_error(await read_message(reader, _CLIENT_LIMITS), self.peer_id).header
            )
            if opened.session_id != spec.session_id:
                raise ProtocolError(
                    f"reply field 'session_id': opened {opened.session_id}, asked for {spec.session_id}"
                )
            return reader

        try:
            reader = await asyncio.wait_for(handshake(), timeout)
        except BaseException as e:
            if writer is not None:
                writer.close()
            if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):
                raise ProviderUnavailableError(self.peer_id, f"inference stream broke while opening: {e!r}") from e
            if isinstance(e, asyncio.TimeoutError):
                raise ProviderUnavailableError(self.peer_id, f"no answer to an open within {timeout} s") from e
            raise
        assert writer is not None  # handshake() set it before returning
        return InferenceStream(self.peer_id, spec, reader, writer, inbox)


@dataclass(frozen=True)
class StreamMessage:
    """A reply on an inference stream, parsed (``reply``), with its tensors."""

    reply: StreamReply
    tensors: list[torch.Tensor]


@dataclass(eq=False)
class InferenceStream:
    """An open inference session on one provider. A reader task forwards every reply to
    the chain's shared inbox as a :class:`StreamMessage`; a broken stream, or a malformed
    reply (ProtocolError), shows up there as the exception, after which nothing more is read."""

    peer_id: str
    spec: OpenSession
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    inbox: asyncio.Queue[Reply]

    def __post_init__(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_replies())

    async def _read_replies(self) -> None:
        try:
            while True:
                message = await read_message(self.reader, _CLIENT_LIMITS)
                reply = parse_stream_reply(message.header)
                self.inbox.put_nowait((self, StreamMessage(reply, message.tensors)))
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            self.inbox.put_nowait((self, e))

    async def send_close(self) -> None:
        """Ask the provider to end the session: it answers with its final receipt, if any,
        and then ends the stream (a broken stream is ignored: it is being closed anyway)."""
        try:
            await self._send({"type": "close", "session_id": self.spec.session_id})
        except ProviderUnavailableError:
            pass

    @property
    def finished(self) -> bool:
        """The provider ended the stream (or it broke) and every reply was delivered."""
        return self._reader_task.done()

    async def send_step(
        self,
        step_id: int,
        position: int,
        hidden: torch.Tensor,
        *,
        mask: tuple[tuple[int, ...], ...] | None = None,
        reorder: tuple[int, ...] | None = None,
    ) -> None:
        step = Step(self.spec.session_id, step_id, position, mask=mask, reorder=reorder)
        await self._send(step.to_header(), (hidden,))

    def send_ack_nowait(self, receipt: dict[str, Any]) -> None:
        """Send the countersigned copy of a receipt back to the provider (the payment channel's
        acknowledgement). Written at once, without waiting for the transport: it is small, and
        a broken stream shows up on the next step anyway."""
        try:
            self.writer.writelines(encode_message({"type": "ack", "ack": receipt}))
        except (ConnectionError, RuntimeError) as e:
            logger.debug(f"could not acknowledge a receipt to {self.peer_id}: {e!r}")

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
