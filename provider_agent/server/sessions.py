"""Inference sessions and their cache bookkeeping: opening a session reserves its KV cache
(bounded by what its ticket can pay for), each step is computed once and signed, receipts
and the client's acks of them travel on the session's stream, idle sessions are closed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from typing import Any

import torch
from hivemind.utils.logging import get_logger

from hivemart_core.errors import ProtocolError
from hivemart_core.models.adapters import Adapter, AdapterError
from hivemart_core.models.backend import LoraWeights
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.commitments import StepRecord, digest_hex, sign_step
from hivemart_core.protocol.framing import Message, read_message, write_message
from hivemart_core.protocol.receipts import work_units
from hivemart_core.protocol.rpc import OpenSession, Relink, Step, error_header, receipt_ack
from hivemart_core.protocol.tickets import JobTicket, TicketError
from provider_agent.limits import RequestError
from provider_agent.metering import outputs_digest
from provider_agent.server.checks import RequestChecks
from provider_agent.server.state import Delivered, Session

logger = get_logger(__name__)

_RECENT_STEPS = 32
# How long a cleanly closed session waits for the client's ack of its final receipt.
_CLOSE_ACK_TIMEOUT_S = 2.0


class SessionRPCs(RequestChecks, ABC):
    """The ``inference`` RPC. Pushing a step's output on to the next provider is the relay's
    (:class:`provider_agent.server.relay.RelayRPCs`), declared here as :meth:`_push`."""

    @abstractmethod
    async def _push(self, session: Session, step: Step, delivered: Delivered) -> None:
        """Send a step's output to the session's next provider (the relay does)."""

    @property
    def cache_bytes_left(self) -> int:
        return max(0, self.config.cache_bytes - self._reserved_bytes)

    @property
    def cache_tokens_left(self) -> int:
        per_token = self.backend.cache_bytes(
            num_layers=self.backend.end - self.backend.start, batch_size=1, max_length=1
        )
        return self.cache_bytes_left // per_token

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
        adapter = self._session_adapter(spec, peer)
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
        session = Session(
            spec=spec, cache=cache, reserved_bytes=needed, client=client, ticket=ticket, peer=peer, adapter=adapter
        )
        self._reserved_bytes += needed
        self.quotas.add_session(peer, needed)
        self.sessions[spec.session_id] = session
        if spec.next_session is not None:
            self._by_next_session[spec.next_session] = session
        return session

    def _session_adapter(self, spec: OpenSession, peer: str) -> Adapter | None:
        """The adapter a session applies: one this peer created here (limits, rank and
        budget were checked then), covering the session's blocks; None without one."""
        if spec.adapter_id is None:
            return None
        adapter = self.adapters.get(spec.adapter_id, peer)
        if not adapter.start <= spec.start < spec.end <= adapter.end:
            raise RequestError(
                codes.BAD_SPAN,
                f"adapter {adapter.adapter_id} covers blocks {adapter.start}:{adapter.end}, "
                f"not the session's {spec.start}:{spec.end}; create one for these blocks",
            )
        return adapter

    @staticmethod
    def _session_lora(session: Session) -> LoraWeights | None:
        """The session's adapter weights for its blocks, as they are now (the owner may replace
        them with the ``adapter`` RPC's ``set``); using them keeps the adapter from expiring."""
        adapter = session.adapter
        if adapter is None:
            return None
        adapter.last_used = time.monotonic()
        spec = session.spec
        rows = adapter.weights[spec.start - adapter.start : spec.end - adapter.start]
        return LoraWeights(adapter.spec, rows, spec.start, source=adapter.weights)

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
            self.batcher.forget(session.spec.session_id)
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
        except (RequestError, TicketError, AdapterError) as e:
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
    ) -> Delivered | None:
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
        self._prepare_cache(session, step, hidden.shape[1])
        charge = (
            None
            if session.ticket is None
            else self.tickets.charge(
                session.ticket, spec.session_id, tokens=hidden.shape[0] * hidden.shape[1], blocks=spec.end - spec.start
            )
        )
        try:
            output = await self.batcher.step(
                self.backend,
                spec.session_id,
                session.cache,
                hidden,
                step.position,
                (spec.start, spec.end),
                self._session_lora(session),
                spec.adapter_id,
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
        session.last_output = Delivered(step.step_id, step.position, output, record, input_record)
        return session.last_output

    @staticmethod
    def _prepare_cache(session: Session, step: Step, tokens: int) -> None:
        """Apply the step's beam reorder and padding mask to the session's cache (checked first)."""
        batch = session.spec.batch_size
        mask = reorder = None
        if step.mask is not None:
            if (len(step.mask), len(step.mask[0])) != (batch, tokens):
                raise RequestError(
                    codes.BAD_SHAPE,
                    f"the step's mask is {len(step.mask)}x{len(step.mask[0])}; its hidden states are {batch}x{tokens}",
                )
            mask = torch.tensor(step.mask, dtype=torch.bool)
        if step.reorder is not None:
            if len(step.reorder) != batch or max(step.reorder) >= batch:
                raise RequestError(
                    codes.BAD_REQUEST, f"'reorder' must give one row index below {batch} for each of the {batch} rows"
                )
            reorder = torch.tensor(step.reorder, dtype=torch.long)
        session.cache.prepare_step(step.position, tokens, mask, reorder)

    async def _expire_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.config.session_idle_timeout))
            deadline = time.monotonic() - self.config.session_idle_timeout
            for session in list(self.sessions.values()):
                if session.last_used < deadline:
                    logger.info(f"closing idle session {session.spec.session_id}")
                    self._close_session(session)
                    session.client.close()
