"""Agents that trust a platform key serve billable RPCs only under valid tickets, and sign
receipts that a client can check against the outputs it received.

Real agent processes on loopback, started with ``--platform-key`` of a test platform
identity; the client side talks raw protocol (framing + rpc headers) so that these tests
pin the wire format, whatever the SDK does on top of it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.p2p import PeerID

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.protocol.framing import Message, read_message, write_message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, WorkReceipt, tensor_digest, verify_receipt, work_units
from hivemart_core.protocol.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, OpenSession, Relink, SpanRequest, Step
from hivemart_core.protocol.tickets import JobTicket, issue_ticket
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm

HIDDEN = 64
PLATFORM = Identity.from_seed(b"hivemart-test-platform-key-seed!")
CLIENT = Identity.from_seed(b"hivemart-test-client-job-key-00!")
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def paid_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(
        tiny_model,
        [(0, 2), (2, 4)],
        tmp_path_factory.mktemp("paid"),
        extra_args=["--platform-key", PLATFORM.public_key.hex(), "--receipt-every", "2"],
    )
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def runtime(paid_swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(paid_swarm.initial_peers) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def first(paid_swarm: LocalSwarm) -> AgentProcess:
    return paid_swarm.agents[0]  # blocks 0:2


@pytest.fixture(scope="module")
def second(paid_swarm: LocalSwarm) -> AgentProcess:
    return paid_swarm.agents[1]  # blocks 2:4


def make_ticket(agent: AgentProcess, *, signer: Identity = PLATFORM, **overrides: Any) -> JobTicket:
    body = dict(
        ticket_id=f"ticket-{next(_ids):04d}-{time.time_ns() % 10**9}",
        job_id=1,
        client_key=CLIENT.public_key.hex(),
        provider_peer=agent.peer_id,
        model_id=agent.ready["model_id"],
        model_digest="ab" * 32,
        start=agent.ready["start"],
        end=agent.ready["end"],
        max_units=10**6,
        price=1000,
        expires_at=int(time.time()) + 3600,
    )
    body.update(overrides)
    body.setdefault("credit_units", body["max_units"])  # no credit limit unless a test sets one
    return issue_ticket(signer, **body)


def hidden(tokens: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


async def call(
    runtime: SwarmRuntime, agent: AgentProcess, rpc: str, header: dict, tensors: tuple[torch.Tensor, ...]
) -> Message:
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(agent.peer_id), rpc)
    try:
        await write_message(writer, header, tensors)
        return await asyncio.wait_for(read_message(reader), 30)
    finally:
        writer.close()


def forward(
    runtime: SwarmRuntime,
    agent: AgentProcess,
    ticket: JobTicket | dict | None,
    *,
    start: int | None = None,
    end: int | None = None,
    tokens: int = 3,
    session_id: str | None = None,
    seed: int = 0,
    ack: dict | None = None,
) -> Message:
    start = agent.ready["start"] if start is None else start
    end = agent.ready["end"] if end is None else end
    data = ticket.to_dict() if isinstance(ticket, JobTicket) else ticket
    header = SpanRequest(start, end, ticket=data, session_id=session_id, ack=ack).to_header()
    return runtime.run(call(runtime, agent, RPC_FORWARD, header, (hidden(tokens, seed),)))


def assert_serves_ticketed_work(runtime: SwarmRuntime, agent: AgentProcess) -> None:
    ticket = make_ticket(agent)
    reply = forward(runtime, agent, ticket)
    assert reply.header["type"] == "output" and reply.tensors[0].shape == (1, 3, HIDDEN)
    receipt = verify_receipt(reply.header["receipt"], ticket)
    assert receipt.units == work_units(tokens=3, blocks=2) and receipt.seq == 1


@pytest.mark.parametrize(
    "case, code",
    [
        ("missing", "ticket_required"),
        ("malformed", "bad_ticket"),
        ("foreign-signature", "ticket_signature"),
        ("tampered-units", "ticket_signature"),
        ("expired", "ticket_expired"),
        ("another-provider", "ticket_wrong_provider"),
        ("blocks-outside", "ticket_blocks"),
        ("exhausted", "ticket_exhausted"),
    ],
)
def test_a_forward_without_a_valid_ticket_is_refused_and_the_agent_keeps_serving(runtime, first, second, case, code):
    ticket: JobTicket | dict | None
    if case == "missing":
        ticket = None
    elif case == "malformed":
        ticket = {"ticket_id": "not-a-ticket"}
    elif case == "foreign-signature":
        ticket = make_ticket(first, signer=Identity.generate())
    elif case == "tampered-units":
        ticket = {**make_ticket(first, max_units=5).to_dict(), "max_units": 10**9}
    elif case == "expired":
        ticket = make_ticket(first, expires_at=int(time.time()) - 3600)
    elif case == "another-provider":
        ticket = make_ticket(second, start=0, end=2)  # signed, but names the other agent
    elif case == "blocks-outside":
        ticket = make_ticket(first, start=0, end=1)
    else:
        ticket = make_ticket(first, max_units=10)  # a forward of 3 tokens through 2 blocks needs 6
        assert "receipt" in forward(runtime, first, ticket).header
    reply = forward(runtime, first, ticket)
    assert reply.header["type"] == "error" and reply.header["code"] == code, reply.header
    assert reply.tensors == []
    assert_serves_ticketed_work(runtime, first)


def test_forward_and_backward_receipts_count_units_and_chain_the_outputs_received(runtime, first):
    ticket, session_id = make_ticket(first), f"train-{next(_ids):08d}"
    mirror = ReceiptCounter(ticket, session_id)
    receipts: list[WorkReceipt] = []
    for seed in range(2):
        reply = forward(runtime, first, ticket, tokens=4, session_id=session_id, seed=seed)
        mirror.record(work_units(tokens=4, blocks=2), tensor_digest(reply.tensors[0]))
        receipts.append(verify_receipt(reply.header["receipt"], ticket))
    header = SpanRequest(0, 2, ticket=ticket.to_dict(), session_id=session_id).to_header()
    reply = runtime.run(call(runtime, first, RPC_BACKWARD, header, (hidden(4, 5), hidden(4, 6))))
    assert reply.header["type"] == "grad"
    mirror.record(work_units(tokens=4, blocks=2, backward=True), tensor_digest(reply.tensors[0]))
    receipts.append(verify_receipt(reply.header["receipt"], ticket))

    assert [(r.seq, r.steps, r.units) for r in receipts] == [(1, 1, 8), (2, 2, 16), (3, 3, 32)]
    assert receipts[-1].units == mirror.units and receipts[-1].chain == mirror.chain
    assert {(r.session_id, r.provider_peer) for r in receipts} == {(session_id, first.peer_id)}


def test_a_forward_without_a_session_id_counts_on_the_session_named_like_its_ticket(runtime, first):
    ticket = make_ticket(first)
    receipts = [verify_receipt(forward(runtime, first, ticket, seed=s).header["receipt"], ticket) for s in range(2)]
    assert [(r.session_id, r.seq, r.units) for r in receipts] == [(ticket.ticket_id, 1, 6), (ticket.ticket_id, 2, 12)]


def test_units_are_counted_per_ticket_across_sessions(runtime, first):
    ticket = make_ticket(first, max_units=13)  # two forwards of 6 units fit, a third does not
    for session in ("session-a-01", "session-b-01"):
        assert forward(runtime, first, ticket, session_id=session).header["type"] == "output"
    reply = forward(runtime, first, ticket, session_id="session-c-01")
    assert reply.header["code"] == "ticket_exhausted"


def test_work_beyond_the_credit_window_waits_for_the_clients_ack(runtime, first):
    from hivemart_core.protocol.receipts import countersign

    ticket = make_ticket(first, credit_units=10)  # a forward of 3 tokens through 2 blocks is 6 units
    session = f"acks-{next(_ids):08d}"
    reply = forward(runtime, first, ticket, session_id=session)
    assert reply.header["type"] == "output"
    refused = forward(runtime, first, ticket, session_id=session, seed=1)  # 6 unacknowledged + 6 > 10
    assert refused.header["code"] == "ack_overdue" and "countersign" in refused.header["message"]
    forged = countersign(WorkReceipt.from_dict(reply.header["receipt"]), Identity.generate())
    assert forward(runtime, first, ticket, session_id=session, ack=forged.to_dict()).header["code"] == "bad_ack"
    acked = countersign(WorkReceipt.from_dict(reply.header["receipt"]), CLIENT)
    again = forward(runtime, first, ticket, session_id=session, seed=1, ack=acked.to_dict())
    assert again.header["type"] == "output" and verify_receipt(again.header["receipt"], ticket).units == 12


class Stream:
    """A raw inference stream: open, steps, close; every message read is kept."""

    def __init__(self, runtime: SwarmRuntime, agent: AgentProcess, spec: OpenSession) -> None:
        self.runtime, self.agent, self.spec = runtime, agent, spec
        self.messages: list[Message] = []

    async def open(self) -> dict:
        _, self.reader, self.writer = await self.runtime.p2p.call_binary_stream_handler(
            PeerID.from_base58(self.agent.peer_id), RPC_INFERENCE
        )
        await write_message(self.writer, self.spec.to_header())
        return (await asyncio.wait_for(read_message(self.reader), 30)).header

    async def send(self, header: dict, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        await write_message(self.writer, header, tensors)

    async def read_until(self, kind: str) -> Message:
        while True:
            message = await asyncio.wait_for(read_message(self.reader), 30)
            self.messages.append(message)
            if message.header.get("type") in (kind, "error"):
                return message

    async def abort(self) -> None:
        """End the stream without a close message."""
        self.writer.close()

    async def close(self) -> list[Message]:
        """A clean close: the agent sends its final receipt, then ends the stream."""
        await write_message(self.writer, {"type": "close", "session_id": self.spec.session_id})
        tail = []
        try:
            while True:
                tail.append(await asyncio.wait_for(read_message(self.reader), 30))
        except asyncio.IncompleteReadError:
            pass
        finally:
            self.writer.close()
        self.messages.extend(tail)
        return tail

    def receipts(self) -> list[dict]:
        return [m.header["receipt"] for m in self.messages if m.header.get("type") == "receipt"]


def test_inference_without_a_valid_ticket_is_refused(runtime, first, second):
    for ticket, code in ((None, "ticket_required"), (make_ticket(second, start=0, end=2), "ticket_wrong_provider")):
        spec = OpenSession(
            session_id=f"refused-{next(_ids):06d}", start=0, end=2, max_length=16, ticket=ticket and ticket.to_dict()
        )
        stream = Stream(runtime, first, spec)
        reply = runtime.run(stream.open())
        runtime.run(stream.abort())  # on the loop: its transports are not thread-safe (closing one here crashed uvloop)
        assert (reply["type"], reply["code"]) == ("error", code)
    assert_serves_ticketed_work(runtime, first)


def test_an_inference_stream_gets_cumulative_receipts_every_n_steps_and_at_close(runtime, first):
    ticket, session_id = make_ticket(first), f"gen-{next(_ids):08d}"
    stream = Stream(
        runtime, first, OpenSession(session_id=session_id, start=0, end=2, max_length=16, ticket=ticket.to_dict())
    )
    mirror = ReceiptCounter(ticket, session_id)

    async def generate() -> list[Message]:
        assert (await stream.open())["type"] == "opened"
        position = 0
        for step_id, tokens in enumerate((4, 1, 1, 1, 1)):  # a prompt, then one token per step
            await stream.send(Step(session_id, step_id, position).to_header(), (hidden(tokens, step_id),))
            output = await stream.read_until("output")
            assert output.header["type"] == "output", output.header
            mirror.record(work_units(tokens=tokens, blocks=2), tensor_digest(output.tensors[0]))
            position += tokens
            if step_id % 2 == 1:  # --receipt-every 2: a receipt follows every second output
                assert (await stream.read_until("receipt")).header["type"] == "receipt"
        return await stream.close()

    tail = runtime.run(generate())
    assert [m.header["type"] for m in tail] == ["receipt"]  # the final receipt covers the fifth step
    receipts = [verify_receipt(r, ticket) for r in stream.receipts()]
    assert [(r.seq, r.steps, r.units) for r in receipts] == [(1, 2, 10), (2, 4, 14), (3, 5, 16)]
    assert receipts[-1].units == mirror.units and receipts[-1].chain == mirror.chain


def test_an_exhausted_ticket_refuses_the_next_step_but_keeps_the_session(runtime, first):
    ticket, session_id = make_ticket(first, max_units=10), f"gen-{next(_ids):08d}"
    stream = Stream(
        runtime, first, OpenSession(session_id=session_id, start=0, end=2, max_length=16, ticket=ticket.to_dict())
    )

    async def run() -> tuple[dict, dict, dict]:
        await stream.open()
        await stream.send(Step(session_id, 0, 0).to_header(), (hidden(4),))  # 8 units
        ok = (await stream.read_until("output")).header
        await stream.send(Step(session_id, 1, 4).to_header(), (hidden(2),))  # 4 more: refused
        refused = (await stream.read_until("output")).header
        await stream.send(Step(session_id, 2, 4).to_header(), (hidden(1),))  # 2 more: exactly the rest
        last = (await stream.read_until("output")).header
        await stream.close()
        return ok, refused, last

    ok, refused, last = runtime.run(run())
    assert ok["type"] == "output" and last["type"] == "output"
    assert (refused["type"], refused["code"], refused["step_id"]) == ("error", "ticket_exhausted", 1)
    final = verify_receipt(stream.receipts()[-1], ticket)
    assert (final.units, final.steps) == (10, 2)


def test_pushed_steps_count_on_the_receiving_sessions_ticket(runtime, first, second):
    tickets = {first.peer_id: make_ticket(first), second.peer_id: make_ticket(second)}
    sessions = {first.peer_id: f"push-a-{next(_ids):06d}", second.peer_id: f"push-b-{next(_ids):06d}"}
    streams = {
        agent.peer_id: Stream(
            runtime,
            agent,
            OpenSession(
                session_id=sessions[agent.peer_id],
                start=start,
                end=start + 2,
                max_length=16,
                ticket=tickets[agent.peer_id].to_dict(),
            ),
        )
        for agent, start in ((first, 0), (second, 2))
    }
    mirror = ReceiptCounter(tickets[second.peer_id], sessions[second.peer_id])

    async def run() -> None:
        a, b = streams[first.peer_id], streams[second.peer_id]
        await a.open(), await b.open()
        await b.send(Relink(sessions[second.peer_id], prev_peer=first.peer_id).to_header())
        await b.read_until("relinked")
        await a.send(
            Relink(sessions[first.peer_id], next_peer=second.peer_id, next_session=sessions[second.peer_id]).to_header()
        )
        await a.read_until("relinked")
        for step_id, tokens in enumerate((3, 1)):
            await a.send(
                Step(sessions[first.peer_id], step_id, 3 * min(step_id, 1)).to_header(), (hidden(tokens, step_id),)
            )
            await a.read_until("output")  # the first hop returns its output too
            output = await b.read_until("output")  # the pushed step's output, from the second agent
            assert output.header["type"] == "output", output.header
            mirror.record(work_units(tokens=tokens, blocks=2), tensor_digest(output.tensors[0]))
        await b.read_until("receipt")  # two steps: --receipt-every 2
        await a.close(), await b.close()

    runtime.run(run())
    second_receipts = [verify_receipt(r, tickets[second.peer_id]) for r in streams[second.peer_id].receipts()]
    assert second_receipts and second_receipts[-1].units == 8 and second_receipts[-1].chain == mirror.chain
    first_receipts = [verify_receipt(r, tickets[first.peer_id]) for r in streams[first.peer_id].receipts()]
    assert first_receipts[-1].units == 8 and first_receipts[-1].provider_peer == first.peer_id


def test_free_mode_agents_ask_for_no_ticket_and_send_no_receipt(two_provider_swarm: LocalSwarm):
    # The session's shared swarm runs in free mode (no --platform-key, no --market).
    with SwarmRuntime(two_provider_swarm.initial_peers) as free_runtime:
        reply = forward(free_runtime, two_provider_swarm.agents[0], None)
        assert reply.header == {"type": "output"} and reply.tensors[0].shape == (1, 3, HIDDEN)


def test_adapters_need_a_ticket_for_their_blocks(runtime: SwarmRuntime, first: AgentProcess) -> None:
    """An adapter holds provider memory for a job: without a ticket of that job, no adapter."""
    from hivemart_core.protocol.rpc import RPC_ADAPTER, AdapterRequest

    def create(ticket: JobTicket | None, start: int = 0, end: int = 2) -> Message:
        request = AdapterRequest(
            "create",
            f"adapter-{next(_ids):04d}",
            start,
            end,
            4,
            8.0,
            ("q_proj", "v_proj"),
            seed=1,
            ticket=ticket.to_dict() if ticket else None,
        )
        return runtime.run(call(runtime, first, RPC_ADAPTER, request.to_header(), ()))

    assert create(None).header["code"] == "ticket_required"
    assert create(make_ticket(first, start=1, end=2)).header["code"] == "ticket_blocks"
    assert create(make_ticket(first, signer=CLIENT)).header["code"] == "ticket_signature"
    created = create(make_ticket(first))
    assert created.header["type"] == "adapter" and created.header["start"] == 0
    assert_serves_ticketed_work(runtime, first)


def _head_only(header: dict, shapes: list[list[int]]) -> bytes:
    """The first frame of a message that declares float32 tensors of ``shapes`` and sends none."""
    import msgpack

    head = msgpack.packb({"h": header, "t": [["float32", shape] for shape in shapes]}, use_bin_type=True)
    return len(head).to_bytes(8, "big") + head


def test_requests_without_a_ticket_are_refused_before_their_tensors_are_read(runtime, first):
    """A peer without a ticket gets its refusal from the head alone: it cannot make the agent
    wait for (and hold) tensors it declares."""
    from hivemart_core.protocol.rpc import RPC_ADAPTER, AdapterRequest

    adapter = AdapterRequest("create", f"adapter-{next(_ids):04d}", 0, 2, 64, 8.0, ("q_proj", "v_proj")).to_header()
    heads = {
        RPC_FORWARD: _head_only(SpanRequest(0, 2).to_header(), [[1, 1024, HIDDEN]]),
        RPC_ADAPTER: _head_only(adapter, [[2, 4096 * 64]]),
    }

    async def send(rpc: str, frame: bytes) -> dict:
        _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(first.peer_id), rpc)
        try:
            writer.write(frame)  # and nothing more
            await writer.drain()
            return (await asyncio.wait_for(read_message(reader), 30)).header
        finally:
            writer.close()

    for rpc, frame in heads.items():
        reply = runtime.run(send(rpc, frame))
        assert (reply["type"], reply["code"]) == ("error", "ticket_required"), (rpc, reply)
    assert_serves_ticketed_work(runtime, first)


def test_a_session_reserves_no_more_cache_than_its_ticket_pays_for(runtime, first):
    """Opening charges nothing, so the cache it reserves is bounded by what the ticket can pay."""
    from hivemart_core.swarm.connection import ProviderConnection

    def tokens_left() -> int:
        return runtime.run(ProviderConnection(runtime.p2p, first.peer_id).info())["cache_tokens_left"]

    before = tokens_left()
    greedy = Stream(
        runtime,
        first,
        OpenSession(
            session_id=f"greedy-{next(_ids):06d}",
            start=0,
            end=2,
            max_length=2048,
            batch_size=64,
            ticket=make_ticket(first, max_units=1).to_dict(),
        ),
    )
    reply = runtime.run(greedy.open())
    runtime.run(greedy.abort())
    assert (reply["type"], reply["code"]) == ("error", "ticket_exhausted"), reply
    assert tokens_left() == before

    # 64 units pay for 32 tokens through 2 blocks: a session asking for 2048 reserves 32.
    ticket, session_id = make_ticket(first, max_units=64), f"capped-{next(_ids):06d}"
    stream = Stream(
        runtime, first, OpenSession(session_id=session_id, start=0, end=2, max_length=2048, ticket=ticket.to_dict())
    )

    async def run() -> tuple[int, dict, dict]:
        assert (await stream.open())["type"] == "opened"
        tokens_left_async = before - (await ProviderConnection(runtime.p2p, first.peer_id).info())["cache_tokens_left"]
        await stream.send(Step(session_id, 0, 0).to_header(), (hidden(32),))
        ok = (await stream.read_until("output")).header
        await stream.send(Step(session_id, 1, 32).to_header(), (hidden(1),))
        refused = (await stream.read_until("output")).header
        await stream.close()
        return tokens_left_async, ok, refused

    reserved, ok, refused = runtime.run(run())
    assert reserved == 32
    assert ok["type"] == "output" and (refused["type"], refused["code"]) == ("error", "ticket_exhausted")
