"""One computation of a job's held/spent/refunded for the API and the web, failure reasons
wherever a failed job is shown, and the market-wide public provider listing (#20).

Runs on SQLite and on PostgreSQL (DATABASE_URL=postgres://...), as the whole marketplace suite does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from django.urls import reverse

from marketplace.jobs.models import Job
from marketplace.jobs.services import SegmentSpec, job_charge, job_create, job_plan_store, job_transition
from marketplace.ledger.selectors import hold_money
from marketplace.ledger.services import clawback
from marketplace.providers.services import provider_measurement_record
from tests.marketplace.factories import make_model, make_provider, make_user, make_wallet
from tests.marketplace.test_api import client_for

pytestmark = pytest.mark.django_db

NO_PLAN = (
    "no plan for the job: blocks 0..4 are served only at >= 500000 micro-credits per million units; raise max_price"
)


def running_job(*, budget: int = 1_000_000, charge: int = 0, blocks: int = 4):  # noqa: ANN201
    """A funded client's job planned on one provider over every block, running, charged ``charge``."""
    model = make_model(num_blocks=blocks)
    provider = make_provider(model=model, price=1_000, name="gpu-box")
    client = make_wallet(user=make_user(), credits=budget * 2).user
    job, _ = job_create(
        user=client, kind="inference", model_id=model.model_id, budget=budget, max_price=5_000, idempotency_key="k"
    )
    job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=blocks, provider=provider)])
    job = job_transition(job=job, to_state=Job.State.RUNNING)
    if charge:
        job_charge(job=job, provider=provider, amount=charge, idempotency_key="receipt-1")
    job.refresh_from_db()
    return job, provider


def money_of(job: Job):  # noqa: ANN201
    job.refresh_from_db()
    return hold_money(holds=[job.hold])[job.hold.pk]


def test_held_spent_refunded_add_up_through_captures_clawbacks_and_release() -> None:
    job, provider = running_job(charge=300_000)
    money = money_of(job)
    assert (money.placed, money.held, money.spent, money.refunded) == (1_000_000, 700_000, 300_000, 0)

    # An audit claws 100000 back while the hold is open: it returns to the escrow, so less is spent.
    clawback(source=provider.earnings_account, hold=job.hold, amount=100_000, idempotency_key="cb-open")
    money = money_of(job)
    assert (money.held, money.spent, money.refunded) == (800_000, 200_000, 0)

    job_transition(job=job, to_state=Job.State.SETTLING)
    job_transition(job=job, to_state=Job.State.DONE)
    money = money_of(job)
    # The regression of #20: a done job holds nothing (the CLI said "held 5.000000", the hold's placed amount).
    assert (money.held, money.spent, money.refunded) == (0, 200_000, 800_000)

    # After the hold closed, a clawback goes to the wallet: refunded, no longer spent.
    clawback(source=provider.earnings_account, hold=job.hold, amount=50_000, idempotency_key="cb-closed")
    money = money_of(job)
    assert (money.held, money.spent, money.refunded) == (0, 150_000, 850_000)
    assert money.held + money.spent + money.refunded + money.forfeited == money.placed


def test_the_api_and_the_web_job_page_show_the_same_figures() -> None:
    job, _ = running_job(charge=300_000)
    job_transition(job=job, to_state=Job.State.SETTLING)
    job_transition(job=job, to_state=Job.State.DONE)
    api = client_for(job.user)
    detail = api.get(f"/api/jobs/{job.pk}/").json()
    assert detail["cost"] == {"held": 0, "spent": 300_000, "refunded": 700_000, "forfeited": 0}
    assert detail["failure_reason"] == ""
    listed = api.get("/api/jobs/").json()["results"]
    assert [j["cost"] for j in listed] == [detail["cost"]]

    web = Client()
    web.force_login(job.user)
    page = web.get(reverse("web:job", args=[job.pk])).content.decode()
    assert 'id="cost-held" data-micro="0"' in page
    assert 'id="cost-captured" data-micro="300000"' in page and "0.300000 credits" in page
    assert 'id="cost-refunded" data-micro="700000"' in page and "0.700000 credits" in page
    listing = web.get(reverse("web:jobs")).content.decode()
    assert "0.300000" in listing and "1.000000" in listing  # spent, and the budget with the same six decimals
    assert "0.005000 credits per million work units (0.020000 per million tokens through all 4 blocks)" in page


def failed_job() -> Job:
    model = make_model(num_blocks=4)
    client = make_wallet(user=make_user(), credits=5_000_000).user
    job, _ = job_create(
        user=client, kind="inference", model_id=model.model_id, budget=1_000_000, max_price=10, idempotency_key="f"
    )
    return job_transition(job=job, to_state=Job.State.FAILED, reason=NO_PLAN)


def test_a_failed_jobs_reason_is_in_the_api_and_at_the_top_of_its_pages() -> None:
    job = failed_job()
    api = client_for(job.user)
    assert api.get(f"/api/jobs/{job.pk}/").json()["failure_reason"] == NO_PLAN
    assert api.get("/api/jobs/", {"state": "failed"}).json()["results"][0]["failure_reason"] == NO_PLAN

    web = Client()
    web.force_login(job.user)
    page = web.get(reverse("web:job", args=[job.pk])).content.decode()
    top = page.split('id="failure-reason"', 1)[1].split("</p>", 1)[0]
    assert "raise max_price" in top
    assert page.index('id="failure-reason"') < page.index("<h2>Cost</h2>")  # at the top, not only in the history
    listing = web.get(reverse("web:jobs")).content.decode()
    assert "served only at &gt;= 500000" in listing


def test_the_job_page_estimates_latency_from_probes_only() -> None:
    job, provider = running_job(blocks=4)  # the provider self-reports 20 ms: not trusted for an estimate
    web = Client()
    web.force_login(job.user)
    speed = lambda: web.get(reverse("web:job", args=[job.pk])).content.decode().split('id="speed"', 1)[1]  # noqa: E731
    unmeasured = speed().split("</p>", 1)[0]
    assert "not estimated" in unmeasured and "ms/token" not in unmeasured and "gpu-box" in unmeasured

    # A probe: 10 ms for a hop and one block, 1000 tokens/s per block, so 10 + 3 x 1 ms over 4 blocks.
    provider_measurement_record(provider=provider, throughput=1000.0, latency_ms=10.0, success_rate=1.0)
    measured = speed().split("</p>", 1)[0]
    assert "<b>13 ms/token</b>" in measured and "probes" in measured


def test_every_provider_is_listed_with_public_fields_only() -> None:
    alice, bob = make_user(username="alice", email="alice@example.com"), make_user(username="bob")
    mine = make_provider(user=alice, model=make_model(num_blocks=6), price=2_000, name="alices-gpu")
    theirs = make_provider(user=bob, price=1_500, name="bobs-gpu", start=1, end=3)
    api = client_for(alice)

    listed = api.get("/api/market/providers/").json()["results"]
    assert {p["id"] for p in listed} == {mine.pk, theirs.pk}  # not only alice's own, as /api/providers/ is
    for p in listed:
        text = str(p)
        assert not {"user", "email", "earnings_account", "public_key", "suspension_reason"} & set(p)
        assert "alice@example.com" not in text and "alice" not in text.replace("alices-gpu", "")
    by_id = {p["id"]: p for p in listed}
    assert by_id[mine.pk]["mine"] and not by_id[theirs.pk]["mine"]
    assert by_id[mine.pk]["price_per_million_tokens"] == 2_000 * 6  # a token through 6 blocks is 6 units
    assert by_id[theirs.pk]["price_per_million_tokens"] == 1_500 * 2
    uptime = by_id[theirs.pk]["uptime"]
    assert uptime["window_s"] == 24 * 3600 and uptime["observed_s"] < 3600  # registered just now
    assert "since it registered" in uptime["text"] and "24 h" not in uptime["text"]

    one = api.get(f"/api/market/providers/{theirs.pk}/").json()
    assert one["name"] == "bobs-gpu" and one["mine"] is False and "earnings_account" not in one
    assert api.get(f"/api/providers/{theirs.pk}/").status_code == 404  # the detailed view stays the owner's
    assert api.get("/api/market/providers/999999/").status_code == 404
    assert [p["id"] for p in api.get("/api/market/providers/", {"model": mine.model.model_id}).json()["results"]] == [
        mine.pk
    ]


def test_public_listing_reports_measured_figures_and_needs_a_key() -> None:
    provider = make_provider(name="probed")
    provider_measurement_record(
        provider=provider, throughput=886.5452454739941, latency_ms=17.23, success_rate=1.0,
        measured_at=datetime.now(UTC) - timedelta(minutes=1),
    )  # fmt: skip
    p = client_for(make_user()).get(f"/api/market/providers/{provider.pk}/").json()
    assert p["measured"] and p["throughput"] == pytest.approx(886.5452454739941) and p["latency_ms"] == 17.23
    assert Client().get("/api/market/providers/").status_code == 401


def test_offers_carry_the_price_per_million_tokens_through_their_span() -> None:
    model = make_model(num_blocks=6)
    make_provider(model=model, start=1, end=4, price=2_500)
    offers = client_for(make_user()).get(f"/api/models/{model.model_id}/offers/").json()
    assert [(o["price"], o["price_per_million_tokens"]) for o in offers] == [(2_500, 7_500)]
