"""Paid work end to end: tickets, receipts, shadow verification, settlement.

Real provider agents (subprocesses on loopback) that require tickets. The first tests sign
tickets with a test platform key and drive the client SDK alone (no marketplace); the last
ones run the whole flow against a live marketplace.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.job import JobPlan, SwarmJob
from client_sdk.swarm.local import AgentSpec
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import load_model_info, load_tokenizer
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import verify_receipt
from hivemart_core.protocol.tickets import issue_ticket
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.cheating_agent import CheatingSwarm
from tests.swarm.conftest import wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

PLATFORM = Identity.from_seed(bytes([11] * 32))
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def local_model(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> torch.Tensor:
    return load_tokenizer(tiny_model)("Receipts count every token", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def ticketed_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CheatingSwarm]:
    """Primaries p0 (0:2) and p1 (2:4), backups b0 and b1, and a cheater c0 (0:2); all ask for tickets."""
    swarm = CheatingSwarm(workdir=tmp_path_factory.mktemp("ticketed"))
    args = ["--platform-key", PLATFORM.public_key.hex(), "--receipt-every", "4"]
    try:
        swarm.start_bootstrap()
        swarm.cheaters = {"c0"}  # all five start side by side: start-up is most of this module's time
        swarm.start_agents(
            tiny_model,
            [(0, 2), (0, 2), (2, 4), (0, 2), (2, 4)],
            names=["c0", "p0", "p1", "b0", "b1"],
            extra_args=args,
        )
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def runtime(ticketed_swarm: CheatingSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(ticketed_swarm.initial_peers) as runtime:
        yield runtime


def agent(swarm: CheatingSwarm, name: str) -> str:
    return next(a.peer_id for a in swarm.agents if a.name == name)


def signed_plan(
    swarm: CheatingSwarm, model_path: Path, client: Identity, segments: list[list[str]], job_id: int = 1
) -> JobPlan:
    """Tickets as the marketplace would issue them for ``segments`` (names, primary first)."""
    info = load_model_info(model_path)
    entries = []
    for index, names in enumerate(segments):
        start, end = 2 * index, 2 * index + 2
        for rank, name in enumerate(names):
            peer = agent(swarm, name)
            ticket = issue_ticket(
                PLATFORM,
                ticket_id=f"tkt_{job_id}_{index}_{name}",
                job_id=job_id,
                client_key=client.public_key.hex(),
                provider_peer=peer,
                model_id=info.model_id,
                model_digest="0" * 64,
                start=start,
                end=end,
                max_units=1_000_000,
                price=1000,
                credit_units=1_000_000,
                expires_at=int(time.time()) + 600,
            )
            entries.append(
                {
                    "segment": index,
                    "role": "backup" if rank else "primary",
                    "rank": rank,
                    "provider_peer": peer,
                    "start": start,
                    "end": end,
                    "ticket": ticket.to_dict(),
                }
            )
    return JobPlan.from_tickets(
        entries,
        platform_key=PLATFORM.public_key,
        job_id=job_id,
        client_key=client.public_key.hex(),
        model_id=info.model_id,
    )


def local_greedy(local_model: AutoModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return local_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def caught_at_step(failover: dict, prompt: torch.Tensor) -> int:
    """Which step (1 = the prompt) a failover happened at, from the session position it records."""
    return 1 if failover["position"] == 0 else failover["position"] - prompt.shape[1] + 2


def test_unticketed_requests_are_refused(tiny_model, runtime, local_model, prompt):
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    with pytest.raises(Exception, match="ticket"):
        model.generate(prompt, max_new_tokens=2)


def test_a_job_routes_by_its_plan_and_countersigns_every_receipt(
    ticketed_swarm, tiny_model, runtime, local_model, prompt
):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["p0", "b0"], ["p1", "b1"]])
    job = SwarmJob(plan, client, job_id=1, verify_rate=1.0, rng=random.Random(0))
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    assert [h.peer_id for h in model.route()] == [agent(ticketed_swarm, "p0"), agent(ticketed_swarm, "p1")]
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), local_greedy(local_model, prompt, NEW_TOKENS))

    summary = job.summary()
    assert summary["receipts"]["refused"] == {}, job.collector.problems
    steps = NEW_TOKENS  # the prompt, then one token per step but the last
    # Every step of both hops was re-run on the backups, and honest providers agree.
    assert summary["verification"] == {"checked": 2 * steps, "mismatches": 0, "skipped": 0, "caught": []}
    by_peer: dict[str, int] = {}
    for receipt in job.collector.latest.values():
        ticket = plan.ticket_for(receipt.provider_peer, 0, 2) or plan.ticket_for(receipt.provider_peer, 2, 4)
        assert verify_receipt(receipt.to_dict(), ticket, require_client_signature=True) == receipt
        by_peer[receipt.provider_peer] = by_peer.get(receipt.provider_peer, 0) + receipt.units
    tokens = prompt.shape[1] + NEW_TOKENS - 1
    # The primaries' final receipts (sent on close) cover every token through their 2 blocks.
    assert by_peer[agent(ticketed_swarm, "p0")] == by_peer[agent(ticketed_swarm, "p1")] == tokens * 2
    # The backups were paid for the verification forwards: the whole prefix at every step.
    prefixes = sum(prompt.shape[1] + i for i in range(steps))
    assert by_peer[agent(ticketed_swarm, "b0")] == by_peer[agent(ticketed_swarm, "b1")] == prefixes * 2


def test_a_cheater_is_caught_reported_and_replaced(ticketed_swarm, tiny_model, runtime, local_model, prompt):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["c0", "b0"], ["p1", "b1"]], job_id=2)
    rate = 0.5
    reported = []

    def file_audit(mismatch):
        reported.append(mismatch)
        return len(reported)

    job = SwarmJob(plan, client, job_id=2, verify_rate=rate, rng=random.Random(7), file_audit=file_audit)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
        failovers = list(session.chain.failovers)
    cheater = agent(ticketed_swarm, "c0")
    assert job.mismatches == 1 and job.excluded == {cheater}
    [mismatch] = reported
    assert (mismatch.peer_id, mismatch.reference_peer, mismatch.start, mismatch.end) == (
        cheater,
        agent(ticketed_swarm, "b0"),
        0,
        2,
    )
    assert mismatch.ticket.provider_peer == cheater and not mismatch.comparison.matches
    [failover] = failovers
    assert failover["peer_id"] == cheater and failover["replacement"] == [
        agent(ticketed_swarm, "b0"),
        agent(ticketed_swarm, "p1"),
    ]
    caught_at = caught_at_step(failover, prompt)
    assert caught_at <= 3 / rate  # 95% of cheaters are caught within 3/r steps (here: seeded)
    # From the step that caught it on, the tokens are what honest blocks compute from the same history.
    first = prompt.shape[1] + caught_at - 1
    with torch.inference_mode():
        logits = local_model(tokens).logits
    assert torch.equal(tokens[0, first:], logits[0, first - 1 : -1].argmax(-1))


def test_failover_moves_to_the_planned_backup_with_its_own_ticket(
    ticketed_swarm, tiny_model, runtime, local_model, prompt
):
    doomed = ticketed_swarm.start_agent(
        tiny_model, 2, 4, name="k1", extra_args=["--platform-key", PLATFORM.public_key.hex(), "--receipt-every", "4"]
    )
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["p0", "b0"], ["k1", "b1"]], job_id=4)
    job = SwarmJob(plan, client, job_id=4, verify_rate=0.0)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    produced = []

    def on_token(_: torch.Tensor) -> None:
        produced.append(1)
        if len(produced) == 4:
            ticketed_swarm.stop_agent(doomed, sig=signal.SIGKILL)

    with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session, on_token=on_token)
        route = [hop.peer_id for hop in session.chain.route]
    assert torch.equal(tokens, local_greedy(local_model, prompt, NEW_TOKENS))
    backup = agent(ticketed_swarm, "b1")
    assert route == [agent(ticketed_swarm, "p0"), backup]
    assert job.collector.problems == []
    # The backup was paid on its own ticket for the replayed history and every later step.
    backup_ticket = plan.ticket_for(backup, 2, 4)
    [receipt] = [r for r in job.collector.latest.values() if r.ticket_id == backup_ticket.ticket_id]
    assert receipt.units == (prompt.shape[1] + NEW_TOKENS - 1) * 2 and receipt.client_signature


def test_a_forward_from_a_cheater_is_caught_and_rerouted(ticketed_swarm, tiny_model, runtime, local_model):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["c0", "b0"], ["p1", "b1"]], job_id=5)
    reported = []
    job = SwarmJob(plan, client, job_id=5, verify_rate=1.0, file_audit=reported.append)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    input_ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(input_ids), local_model(input_ids).logits
    assert torch.allclose(logits, expected, atol=1e-4)  # the cheater's output was never used
    cheater = agent(ticketed_swarm, "c0")
    assert job.mismatches == 1 and job.excluded == {cheater} and [m.peer_id for m in reported] == [cheater]
    assert [f["peer_id"] for f in model.remote.failovers] == [cheater]
    assert job.collector.problems == []


def test_forward_and_backward_are_billed_per_chunk_lane(ticketed_swarm, tiny_model, runtime):
    client = Identity.generate()
    plan = signed_plan(ticketed_swarm, tiny_model, client, [["p0", "b0"], ["p1", "b1"]], job_id=3)
    job = SwarmJob(plan, client, job_id=3, verify_rate=0.0)
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
    job.attach(model)
    model.remote.max_chunk_tokens = 8  # two chunks of 2 x 4 tokens, concurrently
    hidden = model.parts.embed(torch.randint(0, 100, (4, 4))).detach().requires_grad_(True)
    output = model.run_blocks(hidden)
    output.pow(2).mean().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert job.collector.problems == []
    # Two lanes x two providers; each lane: a forward (8 tokens x 2 blocks) and a backward (double),
    # counted in sessions of their own. A reply lost under load moves a lane to a fresh session
    # (the provider may have counted work the client never saw), so count per provider, not per
    # receipt: every unit billed exactly once, in at least one session per lane.
    per_provider: dict[str, list[int]] = {}
    for receipt in job.collector.latest.values():
        per_provider.setdefault(receipt.provider_peer, []).append(receipt.units)
    assert sorted(per_provider) == sorted([agent(ticketed_swarm, "p0"), agent(ticketed_swarm, "p1")])
    for units in per_provider.values():
        assert sum(units) == 2 * (8 * 2 + 2 * 8 * 2) and len(units) >= 2


# --- the whole flow against a live marketplace ---------------------------------------------------------

PRIMARY_PRICE = 1_000_000_000  # micro-credits per million units: 1000 per unit, so tiny jobs cost something
BACKUP_PRICE = 1_500_000_000


class Market:
    """The marketplace side of the live test: its rows, read through the ORM; plans stored the
    way the scheduler stores them."""

    def __init__(self, providers: dict, client_user) -> None:
        self.providers, self.client_user = providers, client_user

    def plan(self, job_id: int, segments: list[tuple[str, list[str]]]) -> None:
        """Store a plan (names: primary, backups per two-block segment) as the scheduler would."""
        from marketplace.jobs.models import Job
        from marketplace.jobs.services import SegmentSpec, job_plan_store

        job_plan_store(
            job=Job.objects.get(pk=job_id),
            segments=[
                SegmentSpec(2 * i, 2 * i + 2, self.providers[primary], backups=[self.providers[b] for b in backups])
                for i, (primary, backups) in enumerate(segments)
            ],
        )

    def start_job(self, client, model_id: str, segments: list[tuple[str, list[str]]], *, budget: int, **kwargs):
        """A job created over REST with a fresh client key, planned, and opened by the SDK."""
        from client_sdk.swarm.job import MarketJob

        identity = Identity.generate()
        row = client.jobs.create(
            model=model_id, kind="inference", budget=budget, max_price=2 * BACKUP_PRICE, client_key=identity.public_key
        )
        self.plan(row.id, segments)
        return MarketJob.open(client, row.id, identity, plan_timeout=10, poll_interval=0.1, **kwargs)

    def earnings(self) -> dict[str, int]:
        from marketplace.ledger.models import Account

        return {name: Account.objects.get(pk=p.earnings_account_id).balance for name, p in self.providers.items()}

    def wallet(self) -> int:
        from marketplace.ledger.services import wallet_get_or_create

        return wallet_get_or_create(user=self.client_user).balance

    @staticmethod
    def stored_units(job_id: int) -> dict[str, int]:
        """Units of the newest stored receipt per (ticket, session), summed per ticket."""
        from marketplace.receipts.models import Receipt

        units: dict[str, int] = {}
        for ticket_id, n in Receipt.objects.filter(ticket__job_id=job_id).values_list("ticket__ticket_id", "units"):
            units[ticket_id] = units.get(ticket_id, 0) + n
        return units


def units_by_ticket(job) -> dict[str, int]:
    units: dict[str, int] = {}
    for receipt in job.collector.latest.values():
        units[receipt.ticket_id] = units.get(receipt.ticket_id, 0) + receipt.units
    return units


def paid_by_name(job, market: Market, units: dict[str, int]) -> dict[str, int]:
    """What each provider is owed for ``units`` per ticket: cost(units) of each of its tickets."""
    from marketplace.receipts.services import ticket_cost

    owed: dict[str, int] = {}
    for provider in job.plan.providers():
        if provider.ticket.ticket_id in units:
            name = next(n for n, p in market.providers.items() if p.peer_id == provider.peer_id)
            cost = ticket_cost(
                units[provider.ticket.ticket_id], max_units=provider.ticket.max_units, price=provider.ticket.price
            )
            owed[name] = owed.get(name, 0) + cost
    return owed


def after_fee(amount: int) -> int:
    from django.conf import settings

    from marketplace.ledger.services import fee_for

    return amount - fee_for(amount, settings.HIVEMART_PLATFORM_FEE_BPS)


@pytest.mark.django_db(transaction=True)
def test_paid_jobs_settle_exactly_cheaters_go_unpaid_and_the_books_balance(
    tiny_model, tmp_path, live_server, settings, local_model, prompt
):
    from client_sdk.swarm.job import JobPlanError, wait_for_plan
    from hivemart_core.api import Client
    from hivemart_core.errors import RemoteError
    from hivemart_core.models import compute_digests
    from marketplace.accounts.services import api_key_create
    from marketplace.jobs.models import Job
    from marketplace.ledger.selectors import ledger_verify
    from marketplace.providers.models import Provider
    from marketplace.receipts.models import Audit, Receipt, Settlement, Ticket
    from marketplace.receipts.services import receipts_settle
    from scheduler.services import audit_decide
    from tests.marketplace.factories import make_model, make_user, make_wallet
    from tests.marketplace.settlement import platform_key_file

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_SETTLE_GRACE_S = 0
    info, digests = load_model_info(tiny_model), compute_digests(tiny_model)
    (tmp_path / "validator").mkdir()
    (tmp_path / "validator" / info.model_id).symlink_to(tiny_model)
    settings.HIVEMART_MODELS_DIR = tmp_path / "validator"  # the audit validator's checkpoints
    make_model(
        model_id=info.model_id,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
    )
    owner = make_user()
    market_args = [
        "--market",
        live_server.url,
        "--api-key",
        api_key_create(user=owner).raw,
        "--heartbeat-period",
        "1",
        "--upload-period",
        "1",
        "--receipt-every",
        "4",
    ]
    client_user = make_wallet(credits=10**9).user
    client = Client(api_key=api_key_create(user=client_user).raw, base_url=live_server.url)

    with CheatingSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.cheaters = {"c0"}
        primary, backup = [*market_args, "--price", str(PRIMARY_PRICE)], [*market_args, "--price", str(BACKUP_PRICE)]
        swarm.start_each(
            [
                AgentSpec("c0", tiny_model, 0, 2, primary),
                AgentSpec("p0", tiny_model, 0, 2, primary),
                AgentSpec("p1", tiny_model, 2, 4, primary),
                AgentSpec("b0", tiny_model, 0, 2, backup),
                AgentSpec("b1", tiny_model, 2, 4, backup),
            ],
        )
        peers = {a.name: a.peer_id for a in swarm.agents}
        registered = wait_for(
            "five agents online",
            lambda: (lambda found: found if len(found) == 5 else None)(
                {p.peer_id: p for p in Provider.objects.filter(user=owner, state="online", reported_throughput__gt=0)}
            ),
        )
        market = Market({name: registered[peer] for name, peer in peers.items()}, client_user)

        # A job nobody plans: the SDK says so instead of waiting forever.
        stuck = client.jobs.create(model=info.model_id, kind="inference", budget=1000, max_price=PRIMARY_PRICE)
        with pytest.raises(JobPlanError, match="no plan"):
            wait_for_plan(client, stuck.id, timeout=0.5, poll_interval=0.1)
        client.jobs.cancel(stuck.id)

        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)
            expected = local_greedy(local_model, prompt, NEW_TOKENS)

            # (a) An honest job: receipts countersigned and uploaded, settlement pays cost(units) minus the fee.
            earnings, wallet = market.earnings(), market.wallet()
            job = market.start_job(
                client,
                info.model_id,
                [("p0", ["b0"]), ("p1", ["b1"])],
                budget=10_000_000,
                verify_rate=0.5,
                rng=random.Random(1),
            )
            job.attach(model)
            assert [h.peer_id for h in model.route()] == [peers["p0"], peers["p1"]]
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), expected)
            summary = job.finish()
            assert summary["state"] == "settling" and summary["receipts"]["refused"] == {}
            assert summary["verification"]["checked"] > 0 and summary["verification"]["mismatches"] == 0
            assert set(summary["receipts"]["upload"]) <= {"accepted", "stale"}
            counted = units_by_ticket(job)
            # The providers' own uploads and the client's agree on every (ticket, session).
            wait_for("the providers' uploads", lambda: market.stored_units(job.job_id) == counted)
            assert Receipt.objects.filter(ticket__job_id=job.job_id).exclude(client_signature="").exists()
            receipts_settle()
            owed = paid_by_name(job, market, counted)
            assert set(owed) == {"p0", "p1", "b0", "b1"} and all(owed.values())  # backups ran the verification
            now = market.earnings()
            assert {n: now[n] - earnings[n] for n in owed} == {n: after_fee(a) for n, a in owed.items()}
            assert market.wallet() == wallet - sum(owed.values())  # the rest of the hold came back
            assert Job.objects.get(pk=job.job_id).state == Job.State.DONE

            # (b) A cheater: caught by shadow verification, the audit finds it cheated, it is not paid.
            earnings, wallet = market.earnings(), market.wallet()
            job = market.start_job(
                client,
                info.model_id,
                [("c0", ["b0"]), ("p1", ["b1"])],
                budget=10_000_000,
                verify_rate=0.5,
                rng=random.Random(7),
            )
            job.attach(model)
            with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
                model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
                [failover] = session.chain.failovers
            assert job.mismatches == 1 and job.excluded == {peers["c0"]} and job.audit_errors == []
            assert failover["peer_id"] == peers["c0"] and caught_at_step(failover, prompt) <= 3 / 0.5
            [audit] = job.audits
            assert audit_decide(audit_id=audit.id)["verdict"] == "provider_cheated"
            stored_audit = Audit.objects.get(pk=audit.id)
            # The client proved the claimed output is one the cheater signed for (its receipt's chain).
            assert stored_audit.provider.peer_id == peers["c0"] and stored_audit.claimed_proven
            summary = job.finish()
            cheater_ticket = job.plan.ticket_for(peers["c0"], 0, 2).ticket_id
            # Receipts of the voided ticket are refused from now on (what came before stays, unpaid).
            assert summary["receipts"]["upload_rejected"] == {"receipt_voided": 1}
            counted = {t: u for t, u in units_by_ticket(job).items() if t != cheater_ticket}
            wait_for(
                "the providers' uploads",
                lambda: {t: u for t, u in market.stored_units(job.job_id).items() if t != cheater_ticket} == counted,
            )
            receipts_settle()
            owed = paid_by_name(job, market, counted)
            now = market.earnings()
            assert now["c0"] == earnings["c0"]  # its work was counted and voided, never paid
            assert Ticket.objects.get(ticket_id=cheater_ticket).voided_at is not None
            assert not Settlement.objects.filter(job_id=job.job_id, provider=market.providers["c0"]).exists()
            assert {n: now[n] - earnings[n] for n in owed} == {n: after_fee(a) for n, a in owed.items()}
            assert market.wallet() == wallet - sum(owed.values())
            assert Provider.objects.get(peer_id=peers["c0"]).reputation < 100

            # (c) A client that never uploads: its providers upload the receipts it countersigned (their
            # acks) and are paid in full, each ticket from its own segment's share of the hold.
            wallet = market.wallet()
            max_units = 2 * (prompt.shape[1] + 3)  # the prompt and three more tokens through 2 blocks
            share = max_units * PRIMARY_PRICE // 1_000_000
            job = market.start_job(
                client,
                info.model_id,
                [("p0", ["b0"]), ("p1", ["b1"])],
                budget=2 * share,
                verify_rate=0.0,
                upload_receipts=False,
            )
            job.attach(model)
            with pytest.raises(RemoteError) as exhausted:
                model.generate(prompt, max_new_tokens=NEW_TOKENS)
            assert exhausted.value.code == "ticket_exhausted" and "--budget" in str(exhausted.value)
            tickets = {job.plan.ticket_for(peers[n], 2 * i, 2 * i + 2).ticket_id: n for i, n in enumerate(["p0", "p1"])}
            assert all(
                job.plan.ticket_for(peers[n], 2 * i, 2 * i + 2).max_units == max_units
                for i, n in enumerate(["p0", "p1"])
            )
            wait_for(
                "the providers' uploads", lambda: market.stored_units(job.job_id) == {t: max_units for t in tickets}
            )
            assert Receipt.objects.filter(ticket__job_id=job.job_id).exclude(client_signature="").exists()
            assert job.collector.countersigned > 0 and job.collector.summary()["upload"] == {}
            receipts_settle()
            settlements = list(Settlement.objects.filter(job_id=job.job_id))
            # Two segments, one share each: both providers are paid in full and nothing falls short.
            assert sorted(s.amount for s in settlements) == [share, share]
            assert sum(s.shortfall for s in settlements) == 0
            assert all(t.settled_units <= t.max_units for t in Ticket.objects.filter(job_id=job.job_id))
            assert market.wallet() == wallet - 2 * share
            job.detach()

        # (d) The books balance after all of it.
        report = ledger_verify()
        assert report.consistent, report
