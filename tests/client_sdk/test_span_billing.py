"""Forward/backward billing: tickets and lane sessions on requests, receipts checked, lost requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from client_sdk.swarm.job import SwarmJob
from client_sdk.swarm.routing import RouteHop
from hivemart_core.errors import ProviderUnavailableError
from hivemart_core.protocol.framing import Message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, tensor_digest, work_units
from hivemart_core.protocol.records import ServerRecord, ServerState
from hivemart_core.protocol.rpc import RPC_BACKWARD, RPC_FORWARD
from hivemart_core.swarm.connection import ProviderConnection
from tests.client_sdk.test_job_plan import CLIENT, JOB, MODEL, PEERS, plan

PROVIDER = Identity.from_seed(bytes([1] * 32))  # PEERS[0]


class FakeProvider:
    """Answers forwards/backwards like a paid provider: counts, chains, signs (no swarm)."""

    def __init__(self, lose_next: bool = False) -> None:
        self.counters: dict[tuple[str, str], ReceiptCounter] = {}
        self.headers: list[dict[str, Any]] = []
        self.lose_next = lose_next

    async def __call__(
        self, rpc: str, header: dict[str, Any], tensors: Sequence[torch.Tensor], timeout: float | None
    ) -> Message:
        from hivemart_core.protocol.tickets import JobTicket

        self.headers.append(header)
        ticket = JobTicket.from_dict(header["ticket"])
        counter = self.counters.setdefault(
            (ticket.ticket_id, header["session_id"]), ReceiptCounter(ticket, header["session_id"])
        )
        output = tensors[0] * 2
        counter.record(
            work_units(
                tokens=output.shape[0] * output.shape[1],
                blocks=header["end"] - header["start"],
                backward=rpc == RPC_BACKWARD,
            ),
            tensor_digest(output),
        )
        if self.lose_next:  # computed and counted, but the reply never reaches the client
            self.lose_next = False
            raise ProviderUnavailableError(PROVIDER.peer_id, "stream broke")
        reply_type = "grad" if rpc == RPC_BACKWARD else "output"  # as a real provider answers
        return Message({"type": reply_type, "receipt": counter.receipt(PROVIDER).to_dict()}, [output])


def hop() -> RouteHop:
    record = ServerRecord(
        peer_id=PEERS[0],
        model_id=MODEL,
        start=0,
        end=2,
        state=ServerState.ONLINE,
        throughput=1.0,
        dtype="float32",
        cache_tokens_left=0,
        expires_at=time.time() + 60,
    )
    return RouteHop(PEERS[0], 0, 2, record)


def call(job: SwarmJob, provider: FakeProvider, lane: object, rpc: str = RPC_FORWARD) -> None:
    connection = ProviderConnection(None, PEERS[0], billing=job.span_billing(hop(), lane))  # type: ignore[arg-type]
    connection._call = provider  # type: ignore[method-assign]
    tensors = (torch.randn(2, 3, 8),) if rpc == RPC_FORWARD else (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    asyncio.run(connection.call(rpc, {"type": "span", "start": 0, "end": 2}, tensors))


def test_requests_carry_the_ticket_and_lane_session_and_receipts_are_countersigned() -> None:
    assert PROVIDER.peer_id == PEERS[0]
    job, provider = SwarmJob(plan(), CLIENT, job_id=JOB, verify_rate=0.0), FakeProvider()
    for lane in (0, 4, 0):
        call(job, provider, lane)
    call(job, provider, 0, RPC_BACKWARD)
    sessions = [h["session_id"] for h in provider.headers]
    assert sessions[0] == sessions[2] == sessions[3] != sessions[1]  # one receipt chain per lane
    assert all(h["ticket"]["provider_peer"] == PEERS[0] for h in provider.headers)
    assert job.collector.problems == [] and job.collector.countersigned == 4
    units = sorted(r.units for r in job.collector.latest.values())
    assert units == [2 * 3 * 2, 2 * (2 * 3 * 2) + 2 * 3 * 2 * 2]


def test_a_lost_reply_moves_the_lane_to_a_new_session() -> None:
    job, provider = SwarmJob(plan(), CLIENT, job_id=JOB, verify_rate=0.0), FakeProvider()
    call(job, provider, 0)
    provider.lose_next = True
    with pytest.raises(ProviderUnavailableError):
        call(job, provider, 0)
    call(job, provider, 0)  # had it kept the session, this receipt would disagree with the mirror
    sessions = [h["session_id"] for h in provider.headers]
    assert sessions[0] == sessions[1] != sessions[2]
    assert job.collector.problems == [] and job.collector.countersigned == 2
