"""An inference session over a chain of providers, with failover.

In *push* mode (the default) the client sends each step to the first provider only; every
provider forwards its output to the next one and the last answers the client, so a token
costs one message per hop. In *round-trip* mode the client relays every hop itself; it is
kept for comparison (``hivemart bench inference`` reports both) and for peers that cannot
reach each other directly.

Every provider also returns its outputs to the client (after pushing them on), so the
client keeps, for each block boundary of the chain, the hidden states that entered it.
When a provider fails (its stream breaks, it reports an error, or it misses a deadline
derived from its speed), the client finds a replacement for its blocks, replays the
recorded inputs to it step by step exactly as they were first sent, so that its KV cache
is bit-for-bit what the failed provider had, re-wires the chain, and resends the step.
Generation then continues with outputs identical to a run without failure.

A session of a paid job (``job``: see :mod:`client_sdk.swarm.job`) opens every hop with the
job ticket of its provider, mirrors each provider's work from the outputs it returns, and
hands the receipts that arrive on the streams to the job's collector; closing asks every
provider for its final receipt. With shadow verification, a step is re-run on a backup
after it completes; a provider caught returning different outputs is reported and replaced,
and every hop after it is rebuilt from the corrected hidden states, so the step still
returns what honest providers compute.

Every output comes with the provider's signed step record (digests of its input and
output), and a pushed hop's output also with the record its upstream pushed with the input.
After each step the client compares every hop's recorded input with the boundary it holds:
a difference is explained either by the upstream provider, whose pushed record differs from
the one it returned (it is excluded and reported with both records as evidence), or by the
hop itself, which cannot back its claim with a record the upstream signed (it is excluded).
Either way the hops from there on are rebuilt, and an honest hop is never verified against
inputs it did not receive.

A session with a LoRA ``adapter`` (:class:`client_sdk.swarm.remote.RemoteLora`) uploads each
hop's slice of it (the rows of the hop's blocks) before opening the hop's session under its
adapter id, on replacement hops too; the providers apply it at every step.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from hivemind.p2p import P2P
from hivemind.utils.logging import get_logger

from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.routing import RouteHop
from hivemart_core.errors import NoProvidersError, ProtocolError, ProviderUnavailableError, RemoteError, SwarmError
from hivemart_core.protocol.commitments import StepRecord, StepRecordError, digest_hex, equivocation
from hivemart_core.protocol.error_codes import (
    BAD_PUSH,
    NEXT_HOP_FAILED,
    UNKNOWN_ADAPTER,
    Retry,
    is_provider_limit,
    is_ticket_error,
    retry_for,
)
from hivemart_core.protocol.receipts import work_units
from hivemart_core.protocol.rpc import OpenSession, ReceiptReply, Relink, RelinkedReply, StepOutputReply
from hivemart_core.protocol.tickets import JobTicket
from hivemart_core.swarm.connection import InferenceStream, ProviderConnection, Reply, StreamMessage

if TYPE_CHECKING:
    from client_sdk.swarm.remote import RemoteLora
    from client_sdk.swarm.verify import Equivocation, ShadowVerifier
    from hivemart_core.swarm.receipts import ReceiptCollector

__all__ = ["ChainSession", "FindRoute", "SessionJob"]

logger = get_logger(__name__)

# find_route(start, end, avoid) -> hops covering [start, end) without the avoided peers
FindRoute = Callable[[int, int, frozenset[str]], Awaitable[list[RouteHop]]]

# Which errors fail over to another provider, which are raised, and which refusals (over a
# provider's own limits) skip to another one at open: ``hivemart_core.protocol.error_codes``.
# Errors a provider reports about another one (named by the error's peer_id).
_NEIGHBOUR_ERRORS = {NEXT_HOP_FAILED, BAD_PUSH}
_MAX_FAILOVERS_PER_STEP = 5
# Step records kept per session, counted in steps back from the newest (a check looks at the current step).
_RECORDS_KEPT_STEPS = 8


def new_session_id() -> str:
    return secrets.token_urlsafe(12)


class SessionJob(Protocol):
    """What a paid job gives its sessions (``client_sdk.swarm.job.SwarmJob`` is one)."""

    collector: ReceiptCollector
    verifier: ShadowVerifier | None

    def ticket_for(self, peer_id: str, start: int, end: int) -> JobTicket | None:
        """The job's ticket for ``peer_id`` covering blocks [start, end), if any."""

    def exclude(self, peer_id: str) -> None:
        """Never route this job to ``peer_id`` again (it was caught returning wrong outputs)."""

    async def report_equivocation(self, equivocation: Equivocation) -> None:
        """A provider pushed one output and returned another (it is excluded already)."""

    async def find_route(self, start: int, end: int, avoid: frozenset[str] = frozenset()) -> list[RouteHop]:
        """The job's planned route over blocks [start, end) without ``avoid``."""


class _HopFailed(Exception):
    def __init__(self, hop: _Hop, reason: str) -> None:
        super().__init__(reason)
        self.hop, self.reason = hop, reason


@dataclass(eq=False)
class _Hop:
    route: RouteHop
    stream: InferenceStream
    relinked: int = 0  # acknowledged relinks
    outputs: int = 0  # step outputs received
    ticket: JobTicket | None = None  # what pays for this hop's session (None: free mode)
    billed_steps: set[int] = field(default_factory=set)  # step ids whose output the receipt mirror counted

    @property
    def start(self) -> int:
        return self.route.start

    @property
    def end(self) -> int:
        return self.route.end

    @property
    def peer_id(self) -> str:
        return self.route.peer_id


@dataclass
class _Entry:
    step_id: int
    position: int
    hidden: torch.Tensor


@dataclass(frozen=True)
class _StepExtras:
    """What a step sends besides hidden states: its padding mask and beam reorder."""

    mask: tuple[tuple[int, ...], ...] | None
    reorder: tuple[int, ...] | None

    @classmethod
    def of(
        cls, mask: torch.Tensor | None, reorder: torch.Tensor | None, shape: torch.Size, batch: int
    ) -> _StepExtras | None:
        if mask is not None:
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"mask must have shape {list(shape)} like the hidden states; got {list(mask.shape)}")
            if bool(mask.bool().all()):
                mask = None  # no padding: nothing to send
        if reorder is not None:
            if reorder.shape != (batch,) or bool((reorder < 0).any()) or bool((reorder >= batch).any()):
                raise ValueError(f"reorder must hold one row index below {batch} per row")
            if torch.equal(reorder.cpu(), torch.arange(batch)):
                reorder = None  # the identity: nothing to send
        if mask is None and reorder is None:
            return None
        return cls(
            None if mask is None else tuple(tuple(int(v) for v in row) for row in mask.bool().int().tolist()),
            None if reorder is None else tuple(int(v) for v in reorder.tolist()),
        )


@dataclass
class _Boundary:
    """Hidden states that entered one block boundary, per step, in order."""

    entries: list[_Entry] = field(default_factory=list)

    def get(self, step_id: int) -> torch.Tensor | None:
        for entry in reversed(self.entries):
            if entry.step_id == step_id:
                return entry.hidden
        return None

    def position_of(self, step_id: int) -> int | None:
        for entry in reversed(self.entries):
            if entry.step_id == step_id:
                return entry.position
        return None

    def record(self, step_id: int, position: int, hidden: torch.Tensor) -> None:
        if self.get(step_id) is None:
            self.entries.append(_Entry(step_id, position, hidden))

    def prefix(self) -> torch.Tensor | None:
        """Every position recorded so far, in order, or None if there is a gap."""
        length = 0
        for entry in self.entries:
            if entry.position != length:
                return None
            length += entry.hidden.shape[1]
        return torch.cat([e.hidden for e in self.entries], dim=1) if self.entries else None

    def truncate(self, position: int) -> None:
        """Forget everything at or after ``position`` (a rollback)."""
        kept = []
        for entry in self.entries:
            if entry.position + entry.hidden.shape[1] <= position:
                kept.append(entry)
            elif entry.position < position:
                kept.append(_Entry(entry.step_id, entry.position, entry.hidden[:, : position - entry.position]))
        self.entries = kept


class ChainSession:
    """A KV-cached inference session across a chain of providers; use :meth:`open`,
    :meth:`step` and :meth:`close` on the swarm loop."""

    def __init__(
        self,
        p2p: P2P,
        route: Sequence[RouteHop],
        *,
        max_length: int,
        batch_size: int = 1,
        push: bool = True,
        find_route: FindRoute | None = None,
        bans: PeerBans | None = None,
        step_timeout: float | None = None,
        min_timeout: float = 1.0,
        job: SessionJob | None = None,
        close_timeout: float = 2.0,
        open_timeout: float = 5.0,
        adapter: RemoteLora | None = None,
    ) -> None:
        if not route:
            raise SwarmError("an inference session needs at least one provider")
        self.p2p = p2p
        self.max_length, self.batch_size, self.push = max_length, batch_size, push
        self.find_route, self.bans = find_route, bans or PeerBans()
        self.step_timeout, self.min_timeout = step_timeout, min_timeout
        self.job, self.close_timeout, self.open_timeout = job, close_timeout, open_timeout
        self.adapter = adapter
        self.position = 0  # tokens processed so far
        self.failovers: list[dict[str, Any]] = []  # what happened, for callers that report it
        self._initial_route = list(route)
        self.hops: list[_Hop] = []
        self._next_step_id = 0
        self._inbox: asyncio.Queue[Reply] = asyncio.Queue()
        self._boundaries: dict[int, _Boundary] = {}
        # (session id, step id) -> the provider's own signed record / the raw record of its pushed input
        self._records: dict[tuple[str, int], StepRecord] = {}
        self._input_records: dict[tuple[str, int], object] = {}
        self._opened: dict[str, RouteHop] = {}  # every session id this client opened -> its provider and span
        # Padding masks and beam reorders of the steps that had them (replays resend them).
        self._extras: dict[int, _StepExtras] = {}
        self._reordered_at = 0  # the position of the latest reorder
        self._plain = True  # no step had a mask or reorder: a boundary's prefix is a plain forward's input

    @property
    def route(self) -> list[RouteHop]:
        return [hop.route for hop in self.hops]

    # --- opening and wiring -------------------------------------------------------------------

    async def open(self) -> None:
        """Open a session on every hop of the route, then wire the chain.

        A provider that cannot open one is routed around: any error, silence (past
        ``open_timeout``), a malformed answer or a broken stream bans it (it may announce
        itself as the best route only to capture sessions it never serves), except a limit
        of its own (``too_long``, ``too_large``), which only skips it for this session. In
        a paid session a ticket error is the job's problem, not the provider's: it is raised.
        """
        route = self._initial_route
        skipped: set[str] = set()
        for _ in range(_MAX_FAILOVERS_PER_STEP):
            results = await asyncio.gather(*(self._open_hop(hop) for hop in route), return_exceptions=True)
            hops = [r for r in results if isinstance(r, _Hop)]
            failed = [(hop, r) for hop, r in zip(route, results, strict=False) if isinstance(r, BaseException)]
            if not failed:
                self.hops = hops
                try:
                    await self._link(range(len(hops)))
                except _HopFailed as e:
                    await self.close()
                    raise ProviderUnavailableError(e.hop.peer_id, f"could not wire the chain: {e.reason}") from None
                return
            for hop in hops:
                hop.stream.close()
            for failed_hop, error in failed:
                self._open_failed(failed_hop, error, skipped)
            try:
                route = await self._reroute(route, [hop for hop, _ in failed], skipped)
            except NoProvidersError as e:
                raise failed[-1][1] from e  # what the last provider said beats "nobody serves these blocks"
        raise SwarmError("could not open an inference session: providers kept failing; try again later")

    def _open_failed(self, hop: RouteHop, error: BaseException, skipped: set[str]) -> None:
        """Ban (or, over one of its limits, skip) a provider that could not open a session;
        raise ``error`` when no other provider would do better."""
        if not isinstance(error, (RemoteError, ProviderUnavailableError, ProtocolError)):
            raise error  # not something the provider did (a bug here, a cancellation)
        if isinstance(error, RemoteError) and self.job is not None and is_ticket_error(error.code):
            raise error
        if isinstance(error, RemoteError) and is_provider_limit(error.code):
            logger.info(f"provider {hop.peer_id} cannot hold this session ({error}); trying others")
            skipped.add(hop.peer_id)
            return
        ban = self.bans.failed(hop.peer_id)
        logger.warning(f"provider {hop.peer_id} could not open a session ({error}); avoiding it for {ban:.0f} s")

    async def _reroute(
        self, route: list[RouteHop], failed: list[RouteHop], skipped: AbstractSet[str] = frozenset()
    ) -> list[RouteHop]:
        if self.find_route is None:
            raise ProviderUnavailableError(failed[0].peer_id, "no way to find a replacement (no route finder)")
        new_route: list[RouteHop] = []
        for hop in route:
            if hop in failed:
                new_route.extend(await self.find_route(hop.start, hop.end, self.bans.banned() | skipped))
            else:
                new_route.append(hop)
        return new_route

    async def _open_hop(self, route_hop: RouteHop) -> _Hop:
        ticket = None if self.job is None else self.job.ticket_for(route_hop.peer_id, route_hop.start, route_hop.end)
        connection = ProviderConnection(self.p2p, route_hop.peer_id)
        for attempt in range(2):  # a second try when the provider forgot our adapter meanwhile
            adapter_id = None
            if self.adapter is not None:
                adapter_id = await self.adapter.ensure(
                    connection,
                    route_hop.start,
                    route_hop.end,
                    self.open_timeout,
                    ticket=None if ticket is None else ticket.to_dict(),
                )
            # return_outputs stays on: failover needs every boundary, and receipts are checked against them.
            spec = OpenSession(
                session_id=new_session_id(),
                start=route_hop.start,
                end=route_hop.end,
                max_length=self.max_length,
                batch_size=self.batch_size,
                return_outputs=True,
                ticket=None if ticket is None else ticket.to_dict(),
                adapter_id=adapter_id,
            )
            try:
                stream = await connection.open_inference(spec, self._inbox, timeout=self.open_timeout)
            except RemoteError as e:
                if self.adapter is None or e.code != UNKNOWN_ADAPTER or attempt:
                    raise
                self.adapter.forget(route_hop.peer_id, route_hop.start, route_hop.end)
                continue
            self._opened[spec.session_id] = route_hop
            return _Hop(route_hop, stream, ticket=ticket)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _link(self, indices: Sequence[int]) -> None:
        """Tell hops ``indices`` (and their neighbours) who pushes to whom, and wait for acks."""
        if not self.push:
            return
        touched: dict[int, Relink] = {}
        my_peer = str(self.p2p.peer_id)
        for i in indices:
            for j in (i - 1, i, i + 1):
                if 0 <= j < len(self.hops) and j not in touched:
                    hop = self.hops[j]
                    nxt = self.hops[j + 1] if j + 1 < len(self.hops) else None
                    touched[j] = Relink(
                        session_id=hop.stream.spec.session_id,
                        prev_peer=self.hops[j - 1].peer_id if j > 0 else my_peer,
                        next_peer=nxt.peer_id if nxt else None,
                        next_session=nxt.stream.spec.session_id if nxt else None,
                        clear_next=nxt is None,
                    )
        expected = {j: self.hops[j].relinked + 1 for j in touched}
        await asyncio.gather(*(self.hops[j].stream.send_relink(relink) for j, relink in touched.items()))
        await self._pump_until(
            lambda: all(self.hops[j].relinked >= n for j, n in expected.items()), self.min_timeout * 5, first_hop=0
        )

    # --- steps -------------------------------------------------------------------------------------

    async def step(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        *,
        mask: torch.Tensor | None = None,
        reorder: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through the chain starting at ``position``
        (default: the end of what the session holds) and return the last span's output.

        ``mask`` [batch, tokens] (1 = real token, 0 = padding, like ``attention_mask``) marks
        padding that later tokens must not attend to; ``reorder`` [batch] first makes every
        provider keep the cached rows of these hypotheses, in this order (beam search)."""
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside the session's 0..{self.position}")
        if position < self._reordered_at:
            # The providers' rows before the reorder were permuted in place; a rollback cannot undo that.
            raise ValueError(f"cannot roll back to {position}: the rows were reordered at {self._reordered_at}")
        extras = _StepExtras.of(mask, reorder, hidden.shape[:2], self.batch_size)
        if position < self.position:
            for boundary in self._boundaries.values():
                boundary.truncate(position)
        step_id = self._new_step_id()
        if extras is not None:
            self._extras[step_id] = extras
            self._plain = False
            if extras.reorder is not None:
                self._reordered_at = position
        self._boundary(self.hops[0].start).record(step_id, position, hidden)
        resume, failure = 0, None
        for _ in range(_MAX_FAILOVERS_PER_STEP + 1):
            try:
                if failure is not None:
                    resume, failure = await self._fail_over(failure, step_id), None
                output = await self._run_step(step_id, position, hidden.shape[1], resume)
                output = await self._check_inputs(step_id, output)
                if self.job is not None and self.job.verifier is not None:
                    output = await self._verify_step(step_id, output)
                self.position = position + hidden.shape[1]
                for hop in self.hops:  # they served: routing may now believe their throughput claims
                    self.bans.succeeded(hop.peer_id)
                return output
            except _HopFailed as failed:
                failure = failed
        raise SwarmError(f"step failed after {_MAX_FAILOVERS_PER_STEP} failovers; the swarm is unstable, try later")

    def _extras_for(self, step_id: int, tokens: int | None = None) -> dict[str, Any]:
        """The step's mask and reorder as sent (``tokens``: of a step cut short by a rollback)."""
        extras = self._extras.get(step_id)
        if extras is None:
            return {}
        mask = extras.mask
        if mask is not None and tokens is not None:
            mask = tuple(row[:tokens] for row in mask)
        return {"mask": mask, "reorder": extras.reorder}

    def _new_step_id(self) -> int:
        self._next_step_id += 1
        return self._next_step_id

    def _boundary(self, block: int) -> _Boundary:
        return self._boundaries.setdefault(block, _Boundary())

    def _arrived(self, block: int, step_id: int) -> Callable[[], bool]:
        """Whether the step's hidden states entered ``block`` (for :meth:`_pump_until`)."""
        return lambda: self._boundary(block).get(step_id) is not None

    def _last_output(self, step_id: int) -> torch.Tensor:
        """The chain's output of a step that :meth:`_pump_until` waited for."""
        output = self._boundary(self.hops[-1].end).get(step_id)
        assert output is not None  # the pump returned only once it was there
        return output

    async def _run_step(self, step_id: int, position: int, tokens: int, resume: int) -> torch.Tensor:
        hops = self.hops[resume:] if not self.push else self.hops[resume : resume + 1]
        for hop in hops:
            hidden = self._boundary(hop.start).get(step_id)
            if hidden is None:  # the previous hop's output has not arrived yet
                await self._pump_until(
                    self._arrived(hop.start, step_id),
                    self._deadline(tokens, resume),
                    first_hop=resume,
                )
                hidden = self._boundary(hop.start).get(step_id)
                assert hidden is not None  # the pump returned only once it was there
            try:
                await hop.stream.send_step(
                    step_id, position, hidden.to(getattr(torch, hop.route.record.dtype)), **self._extras_for(step_id)
                )
            except ProviderUnavailableError as e:
                raise _HopFailed(hop, str(e)) from e
            if not self.push:
                await self._pump_until(
                    self._arrived(hop.end, step_id),
                    self._deadline(tokens, self.hops.index(hop)),
                    first_hop=self.hops.index(hop),
                )
        # Wait for every hop's output, not only the last: they are the history a failover replays.
        await self._pump_until(
            lambda: all(self._boundary(h.end).get(step_id) is not None for h in self.hops[resume:]),
            self._deadline(tokens, resume),
            first_hop=resume,
        )
        output = self._last_output(step_id)
        if output.shape[:2] != (self.batch_size, tokens):
            raise ProtocolError(f"provider {self.hops[-1].peer_id} returned shape {list(output.shape)}")
        return output

    def _deadline(self, tokens: int, first_hop: int) -> float:
        """Seconds to wait for a step: the chain's expected compute time with a wide margin,
        but at least ``min_timeout`` so that a dead peer is noticed in about a second."""
        if self.step_timeout is not None:
            return self.step_timeout
        expected = sum(
            tokens * self.batch_size * (h.end - h.start) / max(h.route.record.throughput, 1e-3)
            for h in self.hops[first_hop:]
        )
        return self.min_timeout + 3 * expected

    async def _pump_until(self, done: Callable[[], bool], timeout: float, *, first_hop: int) -> None:
        """Process replies until ``done()``; a failure or a missed deadline raises _HopFailed."""
        deadline = time.monotonic() + timeout
        while not done():
            if self._inbox.empty():
                try:
                    # asyncio.timeout, unlike wait_for, creates no task: this runs per message.
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                        stream, message = await self._inbox.get()
                except TimeoutError:
                    raise _HopFailed(self._first_silent_hop(first_hop), f"no answer within {timeout:.2f} s") from None
            else:
                stream, message = self._inbox.get_nowait()
            self._dispatch(stream, message)

    def _first_silent_hop(self, first_hop: int) -> _Hop:
        step_id = self._next_step_id
        for hop in self.hops[first_hop:]:
            if self._boundary(hop.end).get(step_id) is None:
                return hop
        return self.hops[first_hop]

    def _dispatch(self, stream: InferenceStream, message: StreamMessage | BaseException) -> None:
        hop = next((h for h in self.hops if h.stream is stream), None)
        if hop is None:
            return  # a reply from a provider we already replaced
        if isinstance(message, BaseException):
            raise _HopFailed(hop, f"stream closed: {message!r}")
        reply = message.reply
        if isinstance(reply, StepOutputReply):
            if len(message.tensors) != 1 or message.tensors[0].ndim != 3:
                raise ProtocolError(f"provider {hop.peer_id} sent a malformed step output")
            # Every hop computes a step at the position the client sent it at (the first boundary
            # holds it): a signed record for another position would vouch for work not asked for.
            sent_at = self._boundary(self.hops[0].start).position_of(reply.step_id)
            if sent_at is not None and reply.position != sent_at:
                raise _HopFailed(
                    hop, f"it answered step {reply.step_id} at position {reply.position}, sent at {sent_at}"
                )
            hop.outputs += 1
            self._keep_records(hop, reply, message.tensors[0])
            self._bill_output(hop, reply.step_id, message.tensors[0])
            self._boundary(hop.end).record(reply.step_id, reply.position, message.tensors[0])
        elif isinstance(reply, RelinkedReply):
            hop.relinked += 1
        elif isinstance(reply, ReceiptReply):
            self._receive_receipt(hop, reply)
        else:
            error = RemoteError(reply.code, reply.message, peer_id=reply.peer_id or hop.peer_id)
            if retry_for(reply.code) is not Retry.OTHER_PROVIDER:
                raise error
            culprit = hop
            if reply.code in _NEIGHBOUR_ERRORS:
                culprit = next((h for h in self.hops if h.peer_id == reply.peer_id), hop)
            raise _HopFailed(culprit, str(error))

    # --- step records ----------------------------------------------------------------------------

    def _keep_records(self, hop: _Hop, reply: StepOutputReply, output: torch.Tensor) -> None:
        """Check and keep the provider's record of an output (a bad one fails the hop) and the
        record of its pushed input as it came (checked only if the input is disputed)."""
        session_id, step_id = hop.stream.spec.session_id, reply.step_id
        try:
            record = (
                StepRecord.from_dict(reply.record)
                .check_about(
                    peer=hop.peer_id,
                    session_id=session_id,
                    step_id=step_id,
                    position=reply.position,
                    output_digest=digest_hex(output),
                    ticket_id="" if hop.ticket is None else hop.ticket.ticket_id,
                )
                .verify()
            )
        except StepRecordError as e:
            raise _HopFailed(hop, f"its step record is not valid: {e}") from None
        self._records.setdefault((session_id, step_id), record)
        if reply.input_record is not None:
            self._input_records.setdefault((session_id, step_id), reply.input_record)

    def _forget_records(self, before_step: int) -> None:
        for records in (self._records, self._input_records):
            for key in [k for k in records if k[1] < before_step]:
                del records[key]

    async def _check_inputs(self, step_id: int, output: torch.Tensor) -> torch.Tensor:
        """Check that every hop computed this step on the hidden states the client holds for
        its first block; after a difference, blame whoever caused it and rebuild the chain from
        there. Returns the step's output (recomputed when the chain was rebuilt)."""
        self._forget_records(step_id - _RECORDS_KEPT_STEPS)
        for index, hop in enumerate(self.hops):
            record = self._records.get((hop.stream.spec.session_id, step_id))
            held = self._boundary(hop.start).get(step_id)
            if record is None or held is None:
                continue  # this hop did not answer the step itself (a failover replaced it mid-step)
            if record.input_digest == digest_hex(held.to(getattr(torch, hop.route.record.dtype))):
                continue
            await self._settle_divergence(index, hop, record, step_id)
            return self._last_output(step_id)
        return output

    async def _settle_divergence(self, index: int, hop: _Hop, record: StepRecord, step_id: int) -> None:
        """Hop ``index`` computed the step on other inputs than the client holds: find who is to
        blame, exclude it, and rebuild the chain from the first hop whose cache is spoiled."""
        blamed, proof = self._divergence_culprit(hop, record, step_id)
        if blamed is None:
            logger.info(
                f"provider {hop.peer_id} computed step {step_id} on the push of a provider that was "
                f"replaced since; rebuilding from it"
            )
            await self._replace_from(index, step_id, reason="computed on a replaced provider's push", exclude=None)
            return
        if proof is None:
            reason = f"its step record claims inputs it cannot show were sent to it (step {step_id})"
            logger.warning(f"provider {blamed} {reason}; excluding it")
            await self._replace_from(index, step_id, reason=reason, exclude=blamed)
            return
        returned, pushed = proof
        span = self._opened[returned.session_id]
        # Rebuild from the culprit when it is still in the chain, else (replaced since) from the hop it spoiled.
        rebuild = next((i for i, h in enumerate(self.hops) if h.stream.spec.session_id == returned.session_id), index)
        logger.warning(
            f"provider {blamed} pushed {hop.peer_id} another output than it returned for step {step_id}; "
            f"excluding and reporting it"
        )
        try:
            await self._replace_from(
                rebuild, step_id, exclude=blamed, reason=f"pushed {hop.peer_id} another output than it returned"
            )
        finally:
            if self.job is not None:
                from client_sdk.swarm.verify import Equivocation

                await self.job.report_equivocation(
                    Equivocation(
                        peer_id=blamed,
                        ticket=self.job.ticket_for(blamed, span.start, span.end),
                        session_id=returned.session_id,
                        start=span.start,
                        end=span.end,
                        step_id=step_id,
                        returned=returned,
                        pushed=pushed,
                        relayed_by=hop.peer_id,
                    )
                )

    def _divergence_culprit(
        self, hop: _Hop, record: StepRecord, step_id: int
    ) -> tuple[str | None, tuple[StepRecord, StepRecord] | None]:
        """Who made ``hop`` compute on inputs the client does not hold: (the upstream peer, its
        two differing records) when its pushed record proves it; (``hop``, None) when ``hop``
        cannot back its claimed input with a record the upstream signed; (None, None) when the
        push came from a provider of ours that never returned this step (nobody is to blame)."""
        raw = self._input_records.get((hop.stream.spec.session_id, step_id))
        if raw is None:
            return hop.peer_id, None  # it says it was pushed nothing, so the client sent it what it holds
        try:
            pushed = StepRecord.from_dict(raw).verify()
            pushed.check_about(
                peer=pushed.peer, step_id=step_id, position=record.position, output_digest=record.input_digest
            )
        except StepRecordError:
            return hop.peer_id, None
        opened = self._opened.get(pushed.session_id)
        if opened is None or opened.peer_id != pushed.peer:
            return hop.peer_id, None  # not a record of any session this client opened
        returned = self._records.get((pushed.session_id, step_id))
        if returned is None:
            return None, None
        if equivocation(returned, pushed):
            return pushed.peer, (returned, pushed)
        # The upstream's records agree, so they are not what the client holds: not this hop's upstream.
        return hop.peer_id, None

    # --- receipts --------------------------------------------------------------------------------

    def _bill_output(self, hop: _Hop, step_id: int, output: torch.Tensor) -> None:
        """Mirror the provider's count: each step it computed once, tokens x blocks."""
        if hop.ticket is None or self.job is None or step_id in hop.billed_steps:
            return  # a step answered twice (pushed and re-sent) is computed, and counted, once
        hop.billed_steps.add(step_id)
        units = work_units(tokens=output.shape[0] * output.shape[1], blocks=hop.end - hop.start)
        self.job.collector.record(hop.ticket, hop.stream.spec.session_id, units, output)

    def _receive_receipt(self, hop: _Hop, reply: ReceiptReply) -> None:
        if hop.ticket is None or self.job is None:
            logger.debug(f"ignoring a receipt from {hop.peer_id}: this session is not billed")
            return
        signed = self.job.collector.receive(reply.receipt, ticket=hop.ticket, session_id=hop.stream.spec.session_id)
        if signed is not None:  # acknowledge it: the provider serves only a credit window beyond its last ack
            hop.stream.send_ack_nowait(signed.to_dict())

    # --- failover ------------------------------------------------------------------------------------

    async def _fail_over(self, failure: _HopFailed, step_id: int) -> int:
        """Replace the failed hop, replay its history, re-wire; returns the hop index to resume from."""
        started = time.monotonic()
        failed = failure.hop
        index = self.hops.index(failed)
        ban = self.bans.failed(failed.peer_id)
        logger.warning(
            f"provider {failed.peer_id} failed ({failure.reason}); avoiding it for {ban:.0f} s and "
            f"moving blocks {failed.start}:{failed.end} to a backup"
        )
        failed.stream.close()
        if self.find_route is None:
            raise ProviderUnavailableError(failed.peer_id, f"{failure.reason}; no way to find a replacement")
        replacement_route = await self.find_route(failed.start, failed.end, self.bans.banned())
        new_hops: list[_Hop] = []
        try:
            for route_hop in replacement_route:
                new_hops.append(await self._open_hop(route_hop))
                await self._replay(new_hops[-1], exclude_step=step_id)
        except (ProviderUnavailableError, RemoteError, _HopFailed) as e:
            for hop in new_hops:
                hop.stream.close()
            peer = e.hop.peer_id if isinstance(e, _HopFailed) else getattr(e, "peer_id", None)
            if peer:
                self.bans.failed(peer)
            # Keep the failed hop in place: the next attempt finds another replacement for it.
            raise _HopFailed(failed, f"replacement failed: {e}") from None
        self.hops[index : index + 1] = new_hops
        await self._link(range(index, index + len(new_hops)))
        self.failovers.append(
            {
                "peer_id": failed.peer_id,
                "blocks": [failed.start, failed.end],
                "replacement": [h.peer_id for h in new_hops],
                "reason": failure.reason,
                "position": self.position,
                "seconds": round(time.monotonic() - started, 3),
            }
        )
        return index

    async def _replay(self, hop: _Hop, *, exclude_step: int) -> None:
        """Send a new hop every recorded input of its blocks, step by step as first sent,
        and record what it returns for the boundary after it (filling any gap there)."""
        entries = [e for e in self._boundary(hop.start).entries if e.step_id != exclude_step]
        dtype = getattr(torch, hop.route.record.dtype)
        for entry in entries:  # pipelined: the provider applies them in order
            extras = self._extras_for(entry.step_id, entry.hidden.shape[1])
            await hop.stream.send_step(entry.step_id, entry.position, entry.hidden.to(dtype), **extras)
        tokens = sum(e.hidden.shape[1] for e in entries)
        timeout = self.min_timeout + 3 * tokens * self.batch_size * (hop.end - hop.start) / max(
            hop.route.record.throughput, 1e-3
        )
        self.hops.append(hop)  # so that its replies are dispatched; not part of the chain yet
        try:
            await self._pump_until(lambda: hop.outputs >= len(entries), timeout, first_hop=len(self.hops) - 1)
        finally:
            self.hops.remove(hop)

    # --- shadow verification -------------------------------------------------------------------------

    async def _verify_step(self, step_id: int, output: torch.Tensor) -> torch.Tensor:
        """Check the step's hops that the verifier picks; after a mismatch, the step's output
        as recomputed without the provider that was caught."""
        assert self.job is not None and self.job.verifier is not None  # step() calls this only then
        verifier = self.job.verifier
        for index, hop in enumerate(self.hops):
            if not verifier.due():
                continue
            prefix, claimed = self._boundary(hop.start).prefix(), self._boundary(hop.end).get(step_id)
            # A plain forward cannot redo masks, reorders or the session's adapter.
            if prefix is None or claimed is None or not self._plain or self.adapter is not None:
                verifier.stats.skipped += 1
                continue
            mismatch = await verifier.check(
                self.p2p, hop.route, hop.ticket, hop.stream.spec.session_id, prefix, claimed
            )
            if mismatch is not None:
                try:  # closing the culprit's session first brings its final receipt: evidence for the audit
                    await self._replace_from(
                        index,
                        step_id,
                        exclude=hop.peer_id,
                        reason=f"outputs differ from {mismatch.reference_peer}'s ({mismatch.comparison})",
                    )
                finally:
                    await verifier.report(mismatch)
                return self._last_output(step_id)
        return output

    async def _replace_from(self, index: int, step_id: int, *, reason: str, exclude: str | None) -> None:
        """Rebuild hop ``index`` and every hop after it on new sessions (their caches and the
        boundaries after hop ``index`` start came from its outputs), without ``exclude``: a
        provider caught cheating, excluded from the job for good (banned, without a job).
        ``exclude=None`` only rebuilds, and may reopen the same providers."""
        started = time.monotonic()
        culprit = self.hops[index]
        avoid = self.bans.banned()
        if exclude is not None:
            if self.job is not None:
                self.job.exclude(exclude)
            else:
                self.bans.failed(exclude)
            avoid |= {exclude}
        if self.find_route is None:
            raise ProviderUnavailableError(culprit.peer_id, f"{reason}; no way to find a replacement")
        end = self.hops[-1].end
        old, self.hops = self.hops[index:], self.hops[:index]
        await self._close_hops(old)
        for _ in range(_MAX_FAILOVERS_PER_STEP):
            self._boundaries = {block: b for block, b in self._boundaries.items() if block <= culprit.start}
            route = await self.find_route(culprit.start, end, avoid | self.bans.banned())
            new_hops: list[_Hop] = []
            try:
                for route_hop in route:  # in order: each replays the boundary its predecessor just rebuilt
                    new_hops.append(await self._open_hop(route_hop))
                    await self._replay(new_hops[-1], exclude_step=-1)
                    self.hops.append(new_hops[-1])
                break
            except (ProviderUnavailableError, RemoteError, _HopFailed) as e:
                peer = e.hop.peer_id if isinstance(e, _HopFailed) else getattr(e, "peer_id", None)
                if peer:
                    self.bans.failed(peer)
                for hop in new_hops:
                    hop.stream.close()
                self.hops = self.hops[:index]
                logger.info(f"rebuilding blocks {culprit.start}:{end} failed ({e}); trying other providers")
        else:
            raise SwarmError(f"could not rebuild blocks {culprit.start}:{end} after replacing {culprit.peer_id}")
        await self._link(range(index, len(self.hops)))
        self.failovers.append(
            {
                "peer_id": culprit.peer_id,
                "blocks": [culprit.start, culprit.end],
                "replacement": [h.peer_id for h in self.hops[index:]],
                "reason": reason,
                "position": self.position,
                "seconds": round(time.monotonic() - started, 3),
            }
        )

    # --- closing ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        hops, self.hops = self.hops, []
        await self._close_hops(hops)

    async def _close_hops(self, hops: Sequence[_Hop]) -> None:
        """Close the streams of ``hops``; billed ones first get a chance to send their final
        receipts (bounded by ``close_timeout``)."""
        billed = [hop for hop in hops if hop.ticket is not None]
        try:
            if billed and self.job is not None:
                await asyncio.gather(*(hop.stream.send_close() for hop in billed))
                await self._collect_final_receipts(billed)
        finally:
            for hop in hops:
                hop.stream.close()

    async def _collect_final_receipts(self, closing: Sequence[_Hop]) -> None:
        by_stream = {hop.stream: hop for hop in [*closing, *self.hops]}
        deadline = time.monotonic() + self.close_timeout
        while True:
            finished = all(hop.stream.finished for hop in closing)
            if finished and self._inbox.empty():
                return
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    stream, message = await self._inbox.get()
            except TimeoutError:
                logger.info("some providers did not end their sessions in time; closing without their last receipts")
                return
            hop = by_stream.get(stream)
            if hop is not None and isinstance(message, StreamMessage) and isinstance(message.reply, ReceiptReply):
                self._receive_receipt(hop, message.reply)
