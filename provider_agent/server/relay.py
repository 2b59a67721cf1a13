"""Pushes between providers: a session's output goes straight to the next provider's session
over one push link per peer; a pushed step is applied only with the pusher's signed record of
that very tensor; errors the next provider reports about our pushes go to the client concerned."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.commitments import StepRecord, StepRecordError, digest_hex
from hivemart_core.protocol.framing import Limits, Message, read_head, read_message, read_tensors, write_message
from hivemart_core.protocol.rpc import RPC_PUSH, ErrorReply, Step, error_header
from provider_agent.limits import BufferLease
from provider_agent.server.sessions import SessionRPCs
from provider_agent.server.state import Delivered, Session

logger = get_logger(__name__)


def _forget_if_last(last: dict[str, asyncio.Task[None]], session_id: str, task: asyncio.Task[None]) -> None:
    """A session's latest pushed step is applied: later ones need not wait for it."""
    if last.get(session_id) is task:
        del last[session_id]


class RelayRPCs(SessionRPCs):
    """The ``push`` RPC, both ends."""

    async def _push(self, session: Session, step: Step, delivered: Delivered) -> None:
        spec = session.spec
        header = dataclasses.replace(step, session_id=spec.next_session).to_header()  # with its mask and reorder
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
        """Read a pusher's link. One link carries the steps of all the sessions the pusher
        pushes here: each step is applied in a task of its own, so that the steps of other
        sessions go on meanwhile (and batch together, see ``batching``), while the steps of
        one session are applied in the order they came."""
        sender = str(stream_info.peer_id)
        first = True
        last: dict[str, asyncio.Task[None]] = {}  # session id -> the task applying its latest step
        while True:
            lease = self.quotas.lease(sender)
            try:
                # A push link is opened when there is a step to push: its first one comes at once.
                head = await (self._first_head(reader, self._limits) if first else read_head(reader, self._limits))
                first = False
                message = Message(head.header, await read_tensors(reader, head, self._limits, lease))
                step = Step.from_header(message.header)
            except asyncio.IncompleteReadError:
                lease.release()
                return
            except BaseException:
                lease.release()
                raise
            task = asyncio.ensure_future(
                self._push_in_order(last.get(step.session_id), sender, step, message, writer, lease)
            )
            last[step.session_id] = task
            task.add_done_callback(functools.partial(_forget_if_last, last, step.session_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _push_in_order(
        self,
        previous: asyncio.Task[None] | None,
        sender: str,
        step: Step,
        message: Message,
        writer: asyncio.StreamWriter,
        lease: BufferLease,
    ) -> None:
        """Apply a pushed step once its session's previous pushed step is applied."""
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own; only the order matters here
            await self._push_step(sender, step, message, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the pusher went away; nothing to answer
        except Exception as e:  # one step's failure never ends the link or the server
            logger.exception(f"push from {sender} failed: {e}")
            await self._try_send(
                writer,
                error_header(
                    codes.INTERNAL, f"{type(e).__name__}: {e}", session_id=step.session_id, step_id=step.step_id
                ),
            )
        finally:
            lease.release()

    async def _push_step(self, sender: str, step: Step, message: Message, writer: asyncio.StreamWriter) -> None:
        """Apply one step a previous provider pushed, after checking the pusher's signed record
        of it (or tell the pusher the session is unknown)."""
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
