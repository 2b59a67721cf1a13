"""Idempotency keys are scoped to their owner (issue 13, item 4).

(a) A provider's owner computes the key settlement will use for its receipts and spends it
first on a payout request of its own; (b) one user's payout request key is reused by another
user. Neither may block anyone's movement or show anyone else's request.
"""

from __future__ import annotations

import hashlib
import importlib

import pytest
from django.apps import apps as django_apps

from marketplace.jobs.models import Job
from marketplace.ledger.models import Account, Transaction
from marketplace.ledger.services import credit_grant
from marketplace.payments.models import PayoutRequest
from marketplace.providers.models import Provider
from marketplace.receipts.models import Receipt, Settlement
from marketplace.receipts.services import receipts_settle
from tests.marketplace.factories import make_user, make_wallet
from tests.marketplace.settlement import planned_job
from tests.security.helpers import api, assert_books_consistent, assert_error_shape

pytestmark = pytest.mark.django_db


def _balance(account_id: int) -> int:
    return Account.objects.get(pk=account_id).balance


def _settlement_key_as_attacker_computes_it(
    job_id: int, provider_id: int, ticket_id: str, session_id: str, units: int, acked_units: int
) -> str:
    """What settlement derives for one receipt: everything in it (units, and those the client
    countersigned) is known to the provider."""
    digest = hashlib.sha256(f"{ticket_id}/{session_id}/{units}/{acked_units}\n".encode()).hexdigest()[:40]
    return f"job:{job_id}:settle:{provider_id}:{digest}"


def _earn_something(provider: Provider) -> None:
    """Give the attacker's provider earnings of its own (a payout needs a balance to spend)."""
    earlier = planned_job(reuse=[provider], backups=0, model=provider.model)
    receipt = earlier.receipt(provider, 2_000_000)
    assert (
        api(earlier.client).post("/api/receipts/", {"receipts": [receipt.to_dict()]}, format="json").status_code == 200
    )
    receipts_settle(job_ids=[earlier.job.pk])
    assert _balance(provider.earnings_account_id) > 0


@pytest.mark.parametrize("ending", ["cancel", "finish"])
def test_a_provider_cannot_block_settlement_by_spending_its_key_first(ending: str) -> None:
    pj = planned_job(backups=0)
    provider = pj.providers[0]
    attacker = provider.user
    _earn_something(provider)
    earned_before = _balance(provider.earnings_account_id)
    wallet = Account.objects.get(kind=Account.Kind.WALLET, user=pj.client).pk
    wallet_before = _balance(wallet)

    receipt = pj.receipt(provider, 3_000_000)  # countersigned by the client: real, acknowledged work
    assert (
        api(attacker)
        .post("/api/receipts/", {"receipts": [receipt.to_dict()]}, format="json")
        .json()["results"][0]["status"]
        == "accepted"
    )
    acked = Receipt.objects.get(ticket__ticket_id=receipt.ticket_id, session_id=receipt.session_id).acked_units
    assert acked == receipt.units  # the client countersigned all of it
    key = _settlement_key_as_attacker_computes_it(
        pj.job.pk, provider.pk, receipt.ticket_id, receipt.session_id, receipt.units, acked
    )
    for spent in (key, f"system:{key}"):  # the bare key, and the key dressed as the system's
        response = api(attacker).post(
            "/api/payouts/", {"provider": provider.pk, "amount": 1, "idempotency_key": spent}, format="json"
        )
        assert response.status_code == 201, response.json()
        assert PayoutRequest.objects.get(pk=response.json()["id"]).idempotency_key == spent

    if ending == "cancel":
        response = api(pj.client).post(f"/api/jobs/{pj.job.pk}/cancel/", {}, format="json")
        assert response.status_code == 200, response.json()
        assert response.json()["state"] == "cancelled"
    else:
        response = api(pj.client).post(f"/api/jobs/{pj.job.pk}/finish/", {"receipts": []}, format="json")
        assert response.status_code == 200, response.json()
        receipts_settle(job_ids=[pj.job.pk], close=False)

    settlement = Settlement.objects.get(job=pj.job, provider=provider)
    assert settlement.amount > 0 and settlement.shortfall == 0
    # The attack aimed at the real key: settlement derived exactly what the attacker spent.
    assert settlement.transaction.request_key == key
    assert settlement.transaction.idempotency_key == f"system:{key}"
    # The victim paid for the work once and nothing more; the attacker gained only its work's pay.
    postings = dict(settlement.transaction.postings.values_list("account_id", "amount"))
    assert _balance(provider.earnings_account_id) == earned_before - 2 + postings[provider.earnings_account_id]
    if ending == "cancel":
        job = Job.objects.select_related("hold").get(pk=pj.job.pk)
        assert job.hold.state == "closed"
        assert _balance(wallet) == wallet_before + job.budget - settlement.amount
    assert_books_consistent()


def _provider_with_earnings() -> Provider:
    pj = planned_job(backups=0)
    _earn_something(pj.providers[0])
    return pj.providers[0]


def _payout(user: object, provider: int, amount: int, key: str) -> object:
    return api(user).post(
        "/api/payouts/", {"provider": provider, "amount": amount, "idempotency_key": key}, format="json"
    )


def test_one_users_payout_key_neither_blocks_nor_reveals_another_users() -> None:
    alice_provider, mallory_provider = _provider_with_earnings(), _provider_with_earnings()
    alice, mallory = alice_provider.user, mallory_provider.user
    alice_before = _balance(alice_provider.earnings_account_id)

    first = _payout(mallory, mallory_provider.pk, 7, "payout-2026-12-07")
    assert first.status_code == 201
    # Alice's own request under the same key goes through; Mallory learns nothing about it.
    mine = _payout(alice, alice_provider.pk, 5, "payout-2026-12-07")
    assert mine.status_code == 201, mine.json()
    assert mine.json()["id"] != first.json()["id"]
    assert _balance(alice_provider.earnings_account_id) == alice_before - 5
    # Keys dressed as another owner's namespace stay the sender's own.
    for dressed in (f"user:{alice.pk}:payout-2026-12-07", "system:payout-2026-12-07"):
        assert _payout(mallory, mallory_provider.pk, 3, dressed).status_code == 201
    again = _payout(alice, alice_provider.pk, 5, "payout-2026-12-07")
    assert again.status_code == 201 and again.json()["id"] == mine.json()["id"]  # a replay, held once
    assert _balance(alice_provider.earnings_account_id) == alice_before - 5
    # A conflict can only be with one's own request, and names only the key.
    conflict = assert_error_shape(
        _payout(mallory, mallory_provider.pk, 8, "payout-2026-12-07"), 409, "idempotency_conflict"
    )
    assert conflict["extra"] == {"idempotency_key": "payout-2026-12-07"}
    assert str(mine.json()["id"]) not in conflict["message"]
    assert_books_consistent()


def test_staff_grants_are_keyed_per_staff_member() -> None:
    staff_a, staff_b = make_user(is_staff=True), make_user(is_staff=True)
    wallet = make_wallet()
    body = {"username": wallet.user.username, "amount": 1_000, "idempotency_key": "grant-1"}
    assert api(staff_a).post("/api/ledger/grants/", body, format="json").status_code == 201
    assert api(staff_b).post("/api/ledger/grants/", {**body, "amount": 2_000}, format="json").status_code == 201
    assert api(staff_a).post("/api/ledger/grants/", body, format="json").status_code == 201  # replay
    assert _balance(wallet.pk) == 3_000
    assert_books_consistent()


def test_the_migration_moves_existing_keys_into_their_namespaces() -> None:
    migration = importlib.import_module("marketplace.ledger.migrations.0006_idempotency_scope")
    assert migration._scoped("job:1:settle:2:ab", "capture", None) == "system:job:1:settle:2:ab"
    assert migration._scoped("job:1:settle:2:ab", "payout", 9) == "user:9:job:1:settle:2:ab"
    assert migration._scoped("k", "grant", None) == "system:k"  # operator command
    long = migration._scoped("x" * 200, "payout", 9)
    assert long.startswith("user:9:legacy:") and len(long) <= 200
    # On rows as an older version stored them: bare keys.
    staff = make_user(is_staff=True)
    grant = credit_grant(account=make_wallet(), amount=10, granted_by=staff, idempotency_key="old-grant")
    Transaction.objects.filter(pk=grant.pk).update(idempotency_key="old-grant")
    migration.forwards(django_apps, None)
    assert Transaction.objects.get(pk=grant.pk).idempotency_key == f"user:{staff.pk}:old-grant"
    # ... so the same request, sent again after the upgrade, is still a replay.
    assert (
        credit_grant(
            account=grant.postings.get(amount=10).account, amount=10, granted_by=staff, idempotency_key="old-grant"
        ).pk
        == grant.pk
    )
