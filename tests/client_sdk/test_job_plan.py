"""A job's plan as routes: planned providers first, backups for failover, tickets checked."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from client_sdk.swarm.job import JobPlan, JobPlanError, MarketJob, wait_for_plan
from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import ServerRecord, ServerState
from hivemart_core.protocol.tickets import TicketError, issue_ticket

PLATFORM = Identity.from_seed(bytes(range(32)))
CLIENT = Identity.from_seed(bytes([9] * 32))
PEERS = [Identity.from_seed(bytes([i + 1] * 32)).peer_id for i in range(5)]
MODEL = "llama-4x64-0123456789ab"
JOB = 42


def entry(
    segment: int,
    role: str,
    rank: int,
    peer: str,
    start: int,
    end: int,
    *,
    signer: Identity = PLATFORM,
    **ticket: object,
) -> dict:
    body = dict(
        ticket_id=f"tkt_{segment}_{rank}_{peer[-6:]}",
        job_id=JOB,
        client_key=CLIENT.public_key.hex(),
        provider_peer=peer,
        model_id=MODEL,
        model_digest="a" * 64,
        start=start,
        end=end,
        max_units=10_000,
        price=1_000_000,
        # Built at import (ENTRIES): valid for a day, so a slow suite reaching these tests late still has live tickets.
        expires_at=int(time.time()) + 86_400,
    )
    body.update(ticket)
    body.setdefault("credit_units", body["max_units"])  # no credit limit unless a test sets one
    return {
        "segment": segment,
        "role": role,
        "rank": rank,
        "provider": 100 + PEERS.index(peer),
        "provider_peer": peer,
        "start": start,
        "end": end,
        "ticket": issue_ticket(signer, **body).to_dict(),
    }


def record(peer: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(
        peer_id=peer,
        model_id=MODEL,
        start=start,
        end=end,
        state=ServerState.ONLINE,
        throughput=100.0,
        dtype="float32",
        cache_tokens_left=1000,
        expires_at=time.time() + 60,
    )


# Two segments: 0:2 by peer 0 (backups 2, then 3) and 2:4 by peer 1 (backup 4).
ENTRIES = [
    entry(0, "primary", 0, PEERS[0], 0, 2),
    entry(0, "backup", 2, PEERS[3], 0, 2),
    entry(0, "backup", 1, PEERS[2], 0, 2),
    entry(1, "primary", 0, PEERS[1], 2, 4),
    entry(1, "backup", 1, PEERS[4], 2, 4),
]
# Every peer is alive; peers 2 and 3 serve all four blocks, which DHT routing would prefer.
RECORDS = {
    PEERS[0]: record(PEERS[0], 0, 2),
    PEERS[1]: record(PEERS[1], 2, 4),
    PEERS[2]: record(PEERS[2], 0, 4),
    PEERS[3]: record(PEERS[3], 0, 4),
    PEERS[4]: record(PEERS[4], 2, 4),
}


def plan() -> JobPlan:
    return JobPlan.from_tickets(
        ENTRIES, platform_key=PLATFORM.public_key, job_id=JOB, client_key=CLIENT.public_key.hex(), model_id=MODEL
    )


def peers(hops) -> list[tuple[str, int, int]]:
    return [(PEERS.index(h.peer_id), h.start, h.end) for h in hops]


def test_the_route_is_the_plan_primaries() -> None:
    assert plan().num_blocks == 4
    assert peers(plan().route(RECORDS, 0, 4, frozenset())) == [(0, 0, 2), (1, 2, 4)]


def test_failover_takes_the_best_ranked_backup_alive() -> None:
    assert peers(plan().route(RECORDS, 0, 2, {PEERS[0]})) == [(2, 0, 2)]
    assert peers(plan().route(RECORDS, 0, 2, {PEERS[0], PEERS[2]})) == [(3, 0, 2)]
    offline = {k: v for k, v in RECORDS.items() if k != PEERS[2]}
    assert peers(plan().route(offline, 0, 4, {PEERS[0]})) == [(3, 0, 2), (1, 2, 4)]
    assert peers(plan().route(RECORDS, 1, 4, frozenset())) == [(0, 1, 2), (1, 2, 4)]  # part of a segment


def test_no_planned_provider_left_says_to_replan() -> None:
    with pytest.raises(JobPlanError, match="new plan"):
        plan().route(RECORDS, 2, 4, {PEERS[1], PEERS[4]})


def test_tickets_and_references() -> None:
    job_plan = plan()
    assert job_plan.ticket_for(PEERS[0], 0, 2).ticket_id.startswith("tkt_0_0")
    assert job_plan.ticket_for(PEERS[0], 2, 4) is None  # peer 2 serves 0:4 but holds a ticket for 0:2 only
    assert job_plan.ticket_for(PEERS[2], 1, 2) is not None
    references = job_plan.references(RECORDS, 0, 2, {PEERS[0]})
    assert [PEERS.index(hop.peer_id) for hop, _ in references] == [2, 3]
    assert all(ticket.covers(0, 2) for _, ticket in references)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (entry(0, "primary", 0, PEERS[0], 0, 2, signer=Identity.generate()), TicketError),
        (entry(0, "primary", 0, PEERS[0], 0, 2, job_id=43), ProtocolError),
        (entry(0, "primary", 0, PEERS[0], 0, 2, client_key=Identity.generate().public_key.hex()), ProtocolError),
        ({**entry(0, "primary", 0, PEERS[0], 0, 2), "provider_peer": PEERS[1]}, TicketError),
        ({**entry(0, "primary", 0, PEERS[0], 0, 2), "end": 3}, ProtocolError),
        ({**entry(0, "primary", 0, PEERS[0], 0, 2), "segment": "0"}, ProtocolError),
        ({k: v for k, v in entry(0, "primary", 0, PEERS[0], 0, 2).items() if k != "role"}, ProtocolError),
        (entry(0, "primary", 0, PEERS[0], 0, 2, model_id="other-model"), TicketError),
    ],
)
def test_tickets_that_do_not_fit_the_job_are_refused(bad: dict, error: type) -> None:
    with pytest.raises(error):
        JobPlan.from_tickets(
            [bad, *ENTRIES[1:]],
            platform_key=PLATFORM.public_key,
            job_id=JOB,
            client_key=CLIENT.public_key.hex(),
            model_id=MODEL,
        )


def test_segments_must_tile_the_blocks() -> None:
    with pytest.raises(JobPlanError):
        JobPlan.from_tickets(
            [ENTRIES[3]], platform_key=PLATFORM.public_key, job_id=JOB, client_key=CLIENT.public_key.hex()
        )
    with pytest.raises(JobPlanError):
        JobPlan.from_tickets([], platform_key=PLATFORM.public_key, job_id=JOB, client_key=CLIENT.public_key.hex())


class FakeJobs:
    """The two job endpoints MarketJob's ticket renewal and plan wait use, answered from memory."""

    def __init__(self, states: list[str] | None = None) -> None:
        self.states, self.renewed = list(states or []), 0

    def renew_tickets(self, job_id: int) -> list[dict]:
        self.renewed += 1
        return [
            entry(
                e["segment"],
                e["role"],
                e["rank"],
                e["provider_peer"],
                e["start"],
                e["end"],
                ticket_id=f"tkt_renewed_{self.renewed}_{i}",
                expires_at=int(time.time()) + 3600,
            )
            for i, e in enumerate(ENTRIES)
        ]

    def get(self, job_id: int) -> SimpleNamespace:
        return SimpleNamespace(
            id=job_id,
            state=self.states.pop(0) if len(self.states) > 1 else self.states[0],
            client_key=CLIENT.public_key.hex(),
        )

    def transitions(self, job_id: int) -> list[SimpleNamespace]:
        # what the scheduler wrote when it gave up on the job, as the API lists it
        return [SimpleNamespace(to_state="failed", reason="served only at >= 500000; raise max_price")]


def test_tickets_about_to_expire_are_renewed() -> None:
    client = SimpleNamespace(jobs=FakeJobs())
    soon = [
        entry(
            e["segment"],
            e["role"],
            e["rank"],
            e["provider_peer"],
            e["start"],
            e["end"],
            expires_at=int(time.time()) + 60,
        )
        for e in ENTRIES
    ]
    job = MarketJob(
        client,
        SimpleNamespace(id=JOB, state="running"),
        JobPlan.from_tickets(soon, platform_key=PLATFORM.public_key, job_id=JOB, client_key=CLIENT.public_key.hex()),
        CLIENT,
        platform_key=PLATFORM.public_key,
        verify_rate=0.0,
    )
    assert job.tickets_expiring()
    old = job.ticket_for(PEERS[0], 0, 2)
    job.renew_tickets()
    assert not job.tickets_expiring() and client.jobs.renewed == 1
    new = job.ticket_for(PEERS[0], 0, 2)
    assert new.ticket_id != old.ticket_id and new.expires_at > old.expires_at


def test_waiting_for_a_plan() -> None:
    assert (
        wait_for_plan(
            SimpleNamespace(jobs=FakeJobs(["pending", "pending", "planned"])), JOB, timeout=5, poll_interval=0
        ).state
        == "planned"
    )
    with pytest.raises(JobPlanError, match="cancelled"):
        wait_for_plan(SimpleNamespace(jobs=FakeJobs(["pending", "cancelled"])), JOB, timeout=5, poll_interval=0)
    # A failed job says why, in the scheduler's words, not only that it will not be planned.
    with pytest.raises(JobPlanError, match="is failed; it will not be planned: served only at >= 500000; raise"):
        wait_for_plan(SimpleNamespace(jobs=FakeJobs(["failed"])), JOB, timeout=5, poll_interval=0)
    with pytest.raises(JobPlanError, match="no plan after"):
        wait_for_plan(SimpleNamespace(jobs=FakeJobs(["pending"])), JOB, timeout=0, poll_interval=0)


def test_a_job_used_as_a_context_manager_is_finished_even_after_an_error() -> None:
    finished = []
    jobs = FakeJobs()
    jobs.finish = lambda job_id: finished.append(job_id) or SimpleNamespace(job=SimpleNamespace(state="settling"))
    job = MarketJob(
        SimpleNamespace(jobs=jobs),
        SimpleNamespace(id=JOB, state="running"),
        plan(),
        CLIENT,
        platform_key=PLATFORM.public_key,
        verify_rate=0.0,
    )
    with pytest.raises(RuntimeError), job:
        raise RuntimeError("the training loop crashed")
    assert finished == [JOB] and job.job.state == "settling"
    with job:  # already settling: nothing to finish
        pass
    assert finished == [JOB]


def test_when_every_planned_provider_of_a_segment_failed_the_job_is_replanned() -> None:
    import asyncio

    from client_sdk.swarm.job import PlanExhaustedError

    jobs = FakeJobs()
    replanned = [
        entry(0, "primary", 0, PEERS[0], 0, 2),
        entry(1, "primary", 0, PEERS[2], 2, 4, ticket_id="tkt_new_0001"),
    ]
    jobs.replan = lambda job_id, provider: jobs.__dict__.setdefault("reported", []).append(provider)
    jobs.tickets = lambda job_id: replanned
    job = MarketJob(
        SimpleNamespace(jobs=jobs),
        SimpleNamespace(id=JOB, state="running"),
        plan(),
        CLIENT,
        platform_key=PLATFORM.public_key,
        verify_rate=0.0,
    )
    job._model = SimpleNamespace(info=SimpleNamespace(model_id=MODEL, num_blocks=4))

    async def records(start: int, end: int) -> dict:
        return RECORDS

    job._records = records
    route = asyncio.run(job.find_route(0, 4, frozenset({PEERS[1], PEERS[4]})))
    assert jobs.reported == [101]  # the failed segment's primary
    assert peers(route) == [(0, 0, 2), (2, 2, 4)] and job.ticket_for(PEERS[2], 2, 4).ticket_id == "tkt_new_0001"
    job.auto_replan = False
    with pytest.raises(PlanExhaustedError):
        asyncio.run(job.find_route(0, 4, frozenset({PEERS[2]})))


def test_create_sends_the_client_key_waits_for_the_plan_and_verifies_its_tickets() -> None:
    jobs = FakeJobs(["pending", "planned"])
    created = {}
    jobs.create = lambda **body: created.update(body) or SimpleNamespace(id=JOB, state="pending")
    jobs.tickets = lambda job_id: ENTRIES
    client = SimpleNamespace(
        jobs=jobs,
        platform=SimpleNamespace(
            get=lambda: SimpleNamespace(public_key_bytes=PLATFORM.public_key, receipts_per_upload=100)
        ),
    )
    job = MarketJob.create(
        client, model=MODEL, budget=1000, max_price=10, identity=CLIENT, poll_interval=0, verify_rate=0.0
    )
    assert created["client_key"] == CLIENT.public_key and created["model"] == MODEL
    assert job.job_id == JOB and [c[0].peer_id for c in job.plan.segments] == [PEERS[0], PEERS[1]]
    assert job.collector.upload_limit == 100  # uploads are split by what the marketplace serves
    forged = SimpleNamespace(public_key_bytes=Identity.generate().public_key, receipts_per_upload=100)
    client.platform = SimpleNamespace(get=lambda: forged)
    jobs.states = ["planned"]
    with pytest.raises(TicketError):  # tickets not signed by the platform key the marketplace states
        MarketJob.create(client, model=MODEL, budget=1000, max_price=10, identity=CLIENT, verify_rate=0.0)
