"""Settlement: receipts become ledger captures (fee split, cumulative rounding, ticket and hold
bounds), finished jobs close and release their holds, and everything stays balanced."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.models import Account, Transaction
from marketplace.ledger.selectors import hold_left, ledger_verify
from marketplace.receipts.models import Receipt, Settlement, Ticket
from marketplace.receipts.services import job_finish, receipts_settle, receipts_upload, ticket_cost
from tests.marketplace.settlement import PlannedJob, planned_job, platform_key_file

pytestmark = pytest.mark.django_db
LATER = timedelta(hours=1)


@pytest.fixture(autouse=True)
def _platform_key(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_PLATFORM_FEE_BPS = 500


def upload(pj: PlannedJob, *receipts: Any, by: Any = None) -> list[str]:
    outcomes = receipts_upload(user=by or pj.client, receipts=[r.to_dict() for r in receipts])
    return [o.status for o in outcomes]


def earnings(provider: Any) -> int:
    return Account.objects.get(pk=provider.earnings_account_id).balance


def fees() -> int:
    return Account.objects.filter(kind=Account.Kind.FEES).values_list("balance", flat=True).first() or 0


def test_ticket_cost_rounds_up_on_cumulative_units_and_stops_at_max_units() -> None:
    assert ticket_cost(0, max_units=10**9, price=1_000) == 0
    assert ticket_cost(1, max_units=10**9, price=1) == 1  # any paid work pays at least one micro-credit
    assert ticket_cost(999_999, max_units=10**9, price=1) == 1
    assert ticket_cost(1_000_000, max_units=10**9, price=1) == 1
    assert ticket_cost(1_000_001, max_units=10**9, price=1) == 2
    assert ticket_cost(5_000_000, max_units=2_000_000, price=1_000) == 2_000


def test_settlement_pays_the_provider_minus_the_fee_from_the_hold() -> None:
    pj = planned_job(budget=1_000_000, price=1_000)
    p = pj.providers[0]
    assert upload(pj, pj.receipt(p, 1_000_000)) == ["accepted"]
    summary = receipts_settle()
    assert (summary.receipts, summary.captured, summary.shortfall, summary.groups) == (1, 1_000, 0, 1)
    assert earnings(p) == 950 and fees() == 50
    assert hold_left(hold=pj.job.hold) == 1_000_000 - 1_000
    settlement = Settlement.objects.get()
    assert (settlement.units, settlement.amount, settlement.transaction.kind) == (1_000_000, 1_000, "capture")
    assert Receipt.objects.get().settled_units == 1_000_000
    # nothing new: a second run pays nothing
    assert receipts_settle().captured == 0 and earnings(p) == 950
    assert ledger_verify().consistent


def test_cumulative_rounding_never_loses_or_invents_credits() -> None:
    pj = planned_job(budget=1_000_000, price=3)
    p = pj.providers[0]
    counter = pj.counter(p)
    for _ in range(10):  # 10 x 100,000 units at 3 per million: 0.3 micro-credits each time
        upload(pj, pj.receipt(p, 100_000, counter=counter))
        receipts_settle()
    assert Ticket.objects.get(job=pj.job, provider=p).settled_amount == 3
    assert sum(Settlement.objects.values_list("amount", flat=True)) == 3
    assert ledger_verify().consistent


def test_sessions_share_the_ticket_bound() -> None:
    pj = planned_job(budget=10_000, price=1_000)  # max_units = 10,000,000
    p = pj.providers[0]
    max_units = pj.ticket(p).max_units
    assert max_units == 10_000_000
    # three countersigned sessions each claiming 60% of the ticket: 180% claimed, 100% payable
    results = upload(pj, *(pj.receipt(p, max_units * 6 // 10, session=f"session-{i:04d}") for i in range(3)), by=p.user)
    assert results == ["accepted"] * 3
    summary = receipts_settle()
    assert summary.captured == ticket_cost(max_units, max_units=max_units, price=1_000) == 10_000
    assert hold_left(hold=pj.job.hold) == 0


def test_a_client_that_never_uploads_still_pays_through_the_providers_receipts() -> None:
    # the provider uploads the receipts the client countersigned (it got them back as acknowledgements)
    pj = planned_job(budget=50_000, price=2_000)
    p = pj.providers[0]
    counter = pj.counter(p)
    upload(pj, pj.receipt(p, 5_000_000, counter=counter), by=p.user)
    receipts_settle()
    assert earnings(p) == 10_000 - 500
    # the provider claims more than the ticket allows: refused, and nothing more is paid
    too_much = pj.receipt(p, pj.ticket(p).max_units, counter=counter, countersigned=False)
    outcome = receipts_upload(user=p.user, receipts=[too_much.to_dict()])[0]
    assert (outcome.status, outcome.code) == ("rejected", "receipt_units")
    receipts_settle()
    assert earnings(p) == 10_000 - 500


def test_each_segment_is_paid_from_its_own_share_of_the_hold() -> None:
    # two equal segments: each segment's tickets get half the budget, so the first provider
    # to settle cannot spend the second one's pay
    pj = planned_job(segments=2, budget=10_000, price=1_000)
    a, b = pj.providers
    assert pj.ticket(a).max_units == pj.ticket(b).max_units == 5_000_000
    upload(pj, pj.receipt(a, 5_000_000), pj.receipt(b, 5_000_000))
    summary = receipts_settle()
    assert summary.captured == 10_000 and summary.shortfall == 0
    assert hold_left(hold=pj.job.hold) == 0
    assert earnings(a) == earnings(b) == 5_000 - 250
    assert ledger_verify().consistent


def test_finishing_settles_and_closing_releases_the_rest_of_the_hold() -> None:
    pj = planned_job(budget=100_000, price=1_000, running=False)
    p = pj.providers[0]
    wallet = Account.objects.get(user=pj.client, kind=Account.Kind.WALLET)
    before = wallet.balance
    job, outcomes = job_finish(job=pj.job, by=pj.client, receipts=[pj.receipt(p, 3_000_000).to_dict()])
    assert job.state == Job.State.SETTLING and [o.status for o in outcomes] == ["accepted"]
    summary = receipts_settle()  # within the grace period: paid, not closed yet
    assert summary.captured == 3_000 and summary.closed == []
    summary = receipts_settle(now=timezone.now() + LATER)
    assert summary.closed == [pj.job.pk]
    pj.job.refresh_from_db()
    assert pj.job.state == Job.State.DONE and pj.job.hold.state == "closed"
    wallet.refresh_from_db()
    assert wallet.balance == before + 100_000 - 3_000
    assert Transaction.objects.filter(hold=pj.job.hold, kind="release").count() == 1
    assert ledger_verify().consistent


def test_a_settling_job_with_unpaid_receipts_is_not_closed() -> None:
    pj = planned_job()
    job_finish(job=pj.job, by=pj.client)
    upload(pj, pj.receipt(pj.providers[0], 1_000_000))
    summary = receipts_settle(now=timezone.now() + LATER)
    # settled first, then closed in the same run
    assert summary.captured == 1_000 and summary.closed == [pj.job.pk]


def test_receipts_for_a_planned_job_start_it() -> None:
    pj = planned_job(running=False)
    upload(pj, pj.receipt(pj.providers[0], 1_000_000))
    receipts_settle()
    pj.job.refresh_from_db()
    assert pj.job.state == Job.State.RUNNING
    assert pj.job.transitions.filter(to_state="running", reason="work receipts arrived").exists()


def test_backups_are_paid_for_their_own_tickets() -> None:
    pj = planned_job(backups=1, price=1_000)
    backup = pj.backups[0]
    upload(pj, pj.receipt(backup, 2_000_000))
    receipts_settle()
    assert earnings(backup) == 2_000 - 100


@pytest.mark.parametrize("ending,running", [("cancelled", True), ("failed", True), ("cancelled", False)])
def test_ending_a_job_early_still_pays_the_work_uploaded(ending: str, running: bool) -> None:
    from marketplace.jobs.services import job_cancel, job_transition

    pj = planned_job(budget=100_000, price=1_000, running=running)
    p = pj.providers[0]
    upload(pj, pj.receipt(p, 7_000_000), by=p.user)
    if ending == "cancelled":
        job_cancel(job=pj.job, by=pj.client)  # a client cannot dodge paying by cancelling
    else:
        job_transition(job=pj.job, to_state=Job.State.FAILED, reason="test")
    pj.job.refresh_from_db()
    assert pj.job.state == ending and pj.job.hold.state == "closed"
    assert earnings(p) == 7_000 - 350
    wallet = Account.objects.get(user=pj.client, kind=Account.Kind.WALLET)
    assert wallet.balance == 200_000 - 7_000
    assert [t.to_state for t in pj.job.transitions.all()][-1] == ending
    assert ledger_verify().consistent
