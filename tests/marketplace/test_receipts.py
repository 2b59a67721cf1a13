"""Tickets and receipt uploads: issuance on plan, the API, and every way a receipt is refused."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient

from hivemart_core.api import Client
from hivemart_core.errors import NotFoundError
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD, countersign
from hivemart_core.protocol.tickets import TicketError, verify_ticket
from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Job
from marketplace.jobs.services import SegmentSpec, job_plan_store
from marketplace.receipts.models import Receipt, Ticket
from marketplace.receipts.services import NO_CLIENT_KEY, receipts_upload
from tests.marketplace.factories import make_user
from tests.marketplace.settlement import planned_job, platform, platform_key_file

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _platform_key(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)


def api(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def upload(user: User, *receipts: Any) -> list[dict[str, Any]]:
    return [o.to_dict() for o in receipts_upload(user=user, receipts=[r.to_dict() for r in receipts])]


# --- tickets -----------------------------------------------------------------------------------


def test_storing_a_plan_issues_a_verifiable_ticket_per_primary_and_backup() -> None:
    pj = planned_job(segments=2, backups=1, budget=2_000_000, price=4_000)
    tickets = list(Ticket.objects.filter(job=pj.job))
    assert len(tickets) == 4
    assert {(t.segment, t.role) for t in tickets} == {(0, "primary"), (0, "backup"), (1, "primary"), (1, "backup")}
    for t in tickets:
        ticket = verify_ticket(
            t.signed,
            platform_key=platform().public_key,
            provider_peer=t.provider.peer_id,
            model_id=pj.job.model.model_id,
        )
        assert (ticket.job_id, ticket.start, ticket.end, ticket.price) == (pj.job.pk, t.block_start, t.block_end, 4_000)
        assert ticket.client_key == pj.job.client_key == pj.client_identity.public_key.hex()
        assert ticket.model_digest == pj.job.model.weights_digest
        # two equal segments: each gets half the budget, primary and backup alike (they share it)
        assert ticket.max_units == 1_000_000 * 1_000_000 // 4_000
        assert t.spend_cap == 1_000_000
        assert ticket.credit_units == t.credit_units == 4_096 * 2  # the window: HIVEMART_CREDIT_WINDOW_TOKENS x blocks
        assert ticket.expires_at > time.time() + 3000
    # another key does not verify them
    with pytest.raises(TicketError) as e:
        verify_ticket(tickets[0].signed, platform_key=Identity.generate().public_key)
    assert e.value.code == "ticket_signature"


def test_a_replan_issues_new_tickets_and_the_api_shows_the_current_ones() -> None:
    pj = planned_job(segments=1, backups=1)
    first = {t["ticket"]["ticket_id"] for t in api(pj.client).get(f"/api/jobs/{pj.job.pk}/tickets/").json()}
    job_plan_store(
        job=pj.job,
        segments=[SegmentSpec(block_start=0, block_end=4, provider=pj.backups[0], backups=[pj.providers[0]])],
    )
    body = api(pj.client).get(f"/api/jobs/{pj.job.pk}/tickets/").json()
    assert [(t["segment"], t["role"], t["rank"], t["provider_peer"]) for t in body] == [
        (0, "primary", 0, pj.backups[0].peer_id),
        (0, "backup", 0, pj.providers[0].peer_id),
    ]
    assert {t["ticket"]["ticket_id"] for t in body}.isdisjoint(first)
    assert Ticket.objects.filter(job=pj.job).count() == 4


def test_tickets_are_visible_to_the_job_owner_only() -> None:
    pj = planned_job()
    assert api(pj.client).get(f"/api/jobs/{pj.job.pk}/tickets/").status_code == 200
    response = api(make_user()).get(f"/api/jobs/{pj.job.pk}/tickets/")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert api().get(f"/api/jobs/{pj.job.pk}/tickets/").status_code == 401
    assert api(make_user(is_staff=True)).get(f"/api/jobs/{pj.job.pk}/tickets/").status_code == 200


def test_jobs_without_a_client_key_get_tickets_that_refuse_countersignatures() -> None:
    pj = planned_job(client_key=False)
    ticket = pj.ticket(pj.providers[0])
    assert ticket.signed["client_key"] == NO_CLIENT_KEY
    provider_only = pj.receipt(pj.providers[0], 10)
    forged = countersign(pj.receipt(pj.providers[0], 10, session="session-0002"), Identity.generate())
    assert [r["status"] for r in upload(pj.client, provider_only)] == ["accepted"]
    assert upload(pj.client, forged)[0]["code"] == "client_signature"


def test_the_platform_endpoint_needs_no_key_and_publishes_the_ticket_key(settings: Any) -> None:
    body = api().get("/api/platform/").json()
    assert body == {
        "public_key": platform().public_key.hex(),
        "peer_id": platform().peer_id,
        "fee_bps": settings.HIVEMART_PLATFORM_FEE_BPS,
        "audit_deposit": settings.HIVEMART_AUDIT_DEPOSIT,
        "limits": {"receipts_per_upload": MAX_RECEIPTS_PER_UPLOAD},
    }


def test_job_creation_validates_the_client_key() -> None:
    user = make_user()
    from tests.marketplace.factories import make_model, make_wallet

    make_wallet(user=user, credits=10_000)
    model = make_model()
    body = {"kind": "inference", "model": model.model_id, "budget": 1000, "max_price": 10, "client_key": "xyz"}
    response = api(user).post("/api/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert response.status_code == 400
    key = Identity.generate().public_key.hex()
    response = api(user).post("/api/jobs/", {**body, "client_key": key}, format="json", HTTP_IDEMPOTENCY_KEY="k2")
    assert response.status_code == 201 and response.json()["client_key"] == key


# --- uploads -------------------------------------------------------------------------------------


def test_receipts_are_accepted_then_replays_are_stale_and_newer_ones_supersede() -> None:
    pj = planned_job()
    p = pj.providers[0]
    counter = pj.counter(p)
    first = pj.receipt(p, 100, counter=counter)
    second = pj.receipt(p, 50, counter=counter)
    assert [r["status"] for r in upload(pj.client, first)] == ["accepted"]
    assert [r["status"] for r in upload(pj.client, second)] == ["accepted"]
    stale = upload(pj.client, first, second)
    assert [(r["status"], r["code"]) for r in stale] == [("stale", "receipt_replay"), ("stale", "receipt_replay")]
    stored = Receipt.objects.get(ticket__ticket_id=first.ticket_id)
    assert (stored.seq, stored.units, stored.steps, stored.client_signature) == (2, 150, 2, second.client_signature)


def test_a_countersignature_arriving_after_the_providers_upload_is_recorded() -> None:
    pj = planned_job()
    p = pj.providers[0]
    signed_by_provider = pj.receipt(p, 70, countersigned=False)
    assert upload(pj.providers[0].user, signed_by_provider)[0]["status"] == "accepted"
    assert Receipt.objects.get().client_signature == ""
    both = countersign(signed_by_provider, pj.client_identity)
    assert upload(pj.client, both)[0]["status"] == "accepted"
    assert Receipt.objects.get().client_signature == both.client_signature


def test_forged_receipts_are_rejected_each_with_its_code() -> None:
    pj = planned_job(segments=2, budget=1_000_000, price=1_000)
    p, other = pj.providers
    good = pj.receipt(p, 10)
    wrong_key = pj.counter(p, "session-wrongkey")
    wrong_key.record(10, b"\0" * 32)
    other_job = planned_job()
    cases = {
        "another peer's receipt": (wrong_key.receipt(Identity.generate()), "receipt_ticket"),
        "signed with the wrong key": (
            replace(good, provider_signature=Identity.generate().sign(good.signing_bytes()).hex()),
            "receipt_signature",
        ),
        "tampered units": (replace(good, units=good.units + 1, seq=9), "receipt_signature"),
        "other job's ticket": (replace(pj.receipt(other, 10), job_id=other_job.job.pk), "receipt_ticket"),
        "unknown ticket": (replace(good, ticket_id="no-such-ticket-0001"), "receipt_ticket"),
        "units beyond the ticket": (
            pj.receipt(p, pj.ticket(p).max_units + 1, session="session-toomany"),
            "receipt_units",
        ),
        "forged countersignature": (
            countersign(pj.receipt(p, 5, session="session-forged", countersigned=False), Identity.generate()),
            "client_signature",
        ),
    }
    results = upload(pj.client, *(r for r, _ in cases.values()))
    assert [(r["status"], r["code"]) for r in results] == [("rejected", code) for _, code in cases.values()]
    assert not Receipt.objects.exists()
    # a signature by the right provider over a receipt naming another peer is still someone else's
    signed_by_wrong_peer = pj.counter(p, "session-peer")
    signed_by_wrong_peer.record(5, b"\1" * 32)
    receipt = signed_by_wrong_peer.receipt(pj.identities[other.pk])
    assert upload(pj.client, receipt)[0]["code"] == "receipt_ticket"


def test_a_newer_receipt_with_fewer_units_is_rejected() -> None:
    pj = planned_job()
    p = pj.providers[0]
    counter = pj.counter(p)
    upload(pj.client, pj.receipt(p, 100, counter=counter))
    counter.units = 40  # a provider trying to rewrite history
    result = upload(pj.client, pj.receipt(p, 0, counter=counter))
    assert (result[0]["status"], result[0]["code"]) == ("rejected", "receipt_units")
    assert Receipt.objects.get().units == 100


def test_the_provider_owner_may_upload_and_strangers_may_not() -> None:
    pj = planned_job()
    p = pj.providers[0]
    receipt = pj.receipt(p, 10, countersigned=False)
    stranger = upload(make_user(), receipt)[0]
    assert (stranger["status"], stranger["code"]) == ("rejected", "permission_denied")
    other_provider_owner = upload(pj.backups[0].user, receipt)[0]
    assert other_provider_owner["code"] == "permission_denied"
    assert upload(p.user, receipt)[0]["status"] == "accepted"
    assert Receipt.objects.get().uploaded_by == p.user


def test_receipts_api_upload_and_listing() -> None:
    pj = planned_job()
    p = pj.providers[0]
    receipt = pj.receipt(p, 10)
    response = api(p.user).post("/api/receipts/", {"receipts": [receipt.to_dict()]}, format="json")
    assert response.status_code == 200 and response.json()["results"][0]["status"] == "accepted"
    for user in (pj.client, p.user):
        listed = api(user).get("/api/receipts/", {"job": pj.job.pk}).json()
        assert [(r["units"], r["countersigned"], r["provider_peer"]) for r in listed["results"]] == [
            (10, True, p.peer_id)
        ]
    assert api(make_user()).get("/api/receipts/").json()["count"] == 0
    bad = api(pj.client).post("/api/receipts/", {"receipts": []}, format="json")
    assert bad.status_code == 400
    too_many = api(pj.client).post(
        "/api/receipts/", {"receipts": [receipt.to_dict()] * (MAX_RECEIPTS_PER_UPLOAD + 1)}, format="json"
    )
    assert too_many.status_code == 400
    malformed = api(pj.client).post("/api/receipts/", {"receipts": [{"ticket_id": 5}]}, format="json").json()
    assert malformed["results"][0]["code"] == "receipt_ticket"


def test_receipts_of_closed_jobs_are_refused() -> None:
    pj = planned_job()
    from marketplace.jobs.services import job_cancel

    job_cancel(job=pj.job, by=pj.client)
    result = upload(pj.client, pj.receipt(pj.providers[0], 10))[0]
    assert (result["status"], result["code"]) == ("rejected", "job_closed")


# --- the SDK ---------------------------------------------------------------------------------------


def sdk(transport: httpx.BaseTransport, user: User | None) -> Client:
    key = api_key_create(user=user).raw if user is not None else None
    return Client(api_key=key, base_url="http://testserver", transport=transport, max_retries=0)


def test_sdk_platform_tickets_receipts_and_finish(wsgi: httpx.WSGITransport) -> None:
    pj = planned_job(running=False)
    assert sdk(wsgi, None).platform.get().public_key_bytes == platform().public_key
    client = sdk(wsgi, pj.client)
    entries = client.jobs.tickets(pj.job.pk)
    assert [(e.segment, e.role, e.provider_peer) for e in entries] == [
        (0, "primary", pj.providers[0].peer_id),
        (0, "backup", pj.backups[0].peer_id),
    ]
    ticket = verify_ticket(entries[0].ticket, platform_key=client.platform.get().public_key_bytes)
    assert ticket.job_id == pj.job.pk
    renewed = client.jobs.renew_tickets(pj.job.pk)
    assert renewed[0].ticket["ticket_id"] != entries[0].ticket["ticket_id"]

    p = pj.providers[0]
    counter = pj.counter(p)
    first = pj.receipt(p, 100, counter=counter)
    results = sdk(wsgi, p.user).receipts.upload([first])
    assert [r.status for r in results] == ["accepted"]
    finished = client.jobs.finish(pj.job.pk, receipts=[pj.receipt(p, 20, counter=counter)])
    assert finished.job.state == Job.State.SETTLING and [r.status for r in finished.results] == ["accepted"]
    stored = client.receipts.list(job=pj.job.pk).items
    assert [(r.units, r.seq) for r in stored] == [(120, 2)]
    with pytest.raises(NotFoundError):
        sdk(wsgi, make_user()).jobs.tickets(pj.job.pk)


def test_sdk_settlements_and_provider_payouts(wsgi: httpx.WSGITransport, settings: Any) -> None:
    from hivemart_core.errors import InsufficientCreditsError
    from marketplace.receipts.services import receipts_settle

    settings.HIVEMART_PLATFORM_FEE_BPS = 500
    pj = planned_job(price=1_000)
    p = pj.providers[0]
    operator = sdk(wsgi, p.user)
    operator.receipts.upload([pj.receipt(p, 4_000_000)])  # countersigned: the client acknowledged it
    receipts_settle()
    paid = operator.receipts.settlements(provider=p.pk).items
    assert [(s.job, s.units, s.amount, s.shortfall) for s in paid] == [(pj.job.pk, 4_000_000, 4_000, 0)]
    assert sdk(wsgi, pj.client).receipts.settlements(job=pj.job.pk).items == paid
    assert sdk(wsgi, make_user()).receipts.settlements().items == []
    assert operator.providers.get(p.pk).reputation == 100
    assert operator.providers.offences(p.pk).items == []
    request = operator.providers.payout(p.pk, amount=3_000)
    assert (request.state, request.amount, request.provider) == ("requested", 3_000, p.pk)
    with pytest.raises(InsufficientCreditsError):
        operator.providers.payout(p.pk, amount=1_000)  # 3,800 earned, 3,000 held for the request
    assert operator.ledger.account(p.earnings_account_id).balance == 800


def test_renewing_tickets_needs_the_owner_and_a_live_job() -> None:
    pj = planned_job()
    before = pj.ticket(pj.providers[0]).ticket_id
    assert api(make_user()).post(f"/api/jobs/{pj.job.pk}/tickets/renew/").status_code == 404
    renewed = api(pj.client).post(f"/api/jobs/{pj.job.pk}/tickets/renew/").json()
    assert renewed[0]["ticket"]["ticket_id"] != before and len(renewed) == 2
    from marketplace.jobs.services import job_cancel

    job_cancel(job=pj.job, by=pj.client)
    response = api(pj.client).post(f"/api/jobs/{pj.job.pk}/tickets/renew/")
    assert response.status_code == 409 and response.json()["code"] == "invalid_state"
