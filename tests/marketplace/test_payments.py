"""Money in and out (marketplace.payments): top-ups through Stripe Checkout (against a loopback
stand-in for Stripe's API, with webhooks signed here the way Stripe signs them) and through the
test payment provider; payout requests held, approved, rejected and paid. Each rule has a test
where someone tries to break it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from marketplace.accounts.models import User
from marketplace.common.errors import InsufficientCredits, InvalidTransition, PermissionDenied
from marketplace.ledger.models import Account, Transaction
from marketplace.ledger.selectors import ledger_verify, wallet_balance
from marketplace.ledger.services import credit_grant, hold_capture, hold_place, wallet_get_or_create
from marketplace.payments.models import PaymentEvent, PayoutRequest, TopUp
from marketplace.payments.services import (
    payout_approve,
    payout_mark_paid,
    payout_reject,
    payout_request_create,
    topup_price,
)
from marketplace.providers.models import Provider
from tests.marketplace.factories import make_provider, make_user
from tests.marketplace.stripe_standin import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    StripeStandIn,
    session_event,
    stripe_signature,
)

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
WEBHOOK = "/api/payments/stripe/webhook/"
MICRO = 1_000_000


def client_for(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def assert_error(response: Any, status: int, code: str) -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert body["code"] == code, body
    return body


@pytest.fixture
def stripe_api(settings: Any) -> Iterator[StripeStandIn]:
    standin = StripeStandIn().start()
    settings.HIVEMART_STRIPE_SECRET_KEY = SECRET_KEY
    settings.HIVEMART_STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.HIVEMART_STRIPE_API_BASE = standin.url
    settings.HIVEMART_TEST_TOPUPS = False
    try:
        yield standin
    finally:
        standin.stop()


def deliver(payload: bytes, signature: str | None = None) -> Any:
    """POST ``payload`` to the webhook as Stripe does (signed with the endpoint's secret unless
    told): no session, no CSRF token, no API key."""
    headers = {"HTTP_STRIPE_SIGNATURE": stripe_signature(payload) if signature is None else signature}
    client = APIClient(enforce_csrf_checks=True)
    return client.post(WEBHOOK, data=payload, content_type="application/json", **headers)


def buy(user: User, credits: int = 500, **extra: Any) -> dict:
    response = client_for(user).post("/api/payments/topups/", {"credits": credits, **extra}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


# --- top-ups through Stripe ------------------------------------------------------------------


def test_price_is_integer_arithmetic_rounded_up(settings: Any) -> None:
    settings.HIVEMART_TOPUP_CREDITS_PER_UNIT, settings.HIVEMART_TOPUP_MINOR_PER_UNIT = 100, 100
    assert topup_price(credits=500) == 500  # 500 credits at a cent each
    settings.HIVEMART_TOPUP_CREDITS_PER_UNIT = 3
    assert topup_price(credits=1) == 34  # 33.33... cents, rounded up: the platform never undercharges
    assert topup_price(credits=3 * 10**8) == 10**10
    settings.HIVEMART_TOPUP_CREDITS_PER_UNIT, settings.HIVEMART_TOPUP_MINOR_PER_UNIT = 1000, 1
    assert topup_price(credits=1) == 1  # never free


def test_a_stripe_top_up_is_credited_once_when_its_session_completes(stripe_api: StripeStandIn) -> None:
    user = make_user()
    topup = buy(user, 500, idempotency_key="buy-1")
    assert topup["state"] == "pending" and topup["provider"] == "stripe"
    assert topup["credits"] == 500 * MICRO and topup["amount_minor"] == 500 and topup["currency"] == "usd"
    # What Stripe was asked for: one line of 500 cents, our top-up as the reference, keyed by the top-up.
    (call,) = stripe_api.requests
    assert call["form"]["mode"] == "payment"
    assert call["form"]["line_items[0][price_data][unit_amount]"] == "500"
    assert call["form"]["client_reference_id"] == str(topup["id"])
    assert call["form"]["success_url"].startswith("http://testserver/wallet/")
    assert call["headers"]["Authorization"] == f"Bearer {SECRET_KEY}"
    assert call["headers"]["Idempotency-Key"] == f"hivemart-topup-{topup['id']}"
    session = stripe_api.sessions[TopUp.objects.get(pk=topup["id"]).external_id]
    assert topup["checkout_url"] == session["url"]

    # A retried request with the same key gets the same top-up, and Stripe is not asked again.
    assert buy(user, 500, idempotency_key="buy-1")["id"] == topup["id"]
    assert len(stripe_api.requests) == 1
    assert wallet_balance(user=user) == 0  # nothing until Stripe says it is paid

    event = session_event(session, event_id="evt_paid_1")
    response = deliver(event)
    assert response.status_code == 200 and response.json() == {"outcome": "applied"}
    assert wallet_balance(user=user) == 500 * MICRO
    got = client_for(user).get(f"/api/payments/topups/{topup['id']}/").json()
    assert got["state"] == "paid" and got["paid_at"]

    # Stripe redelivers the same event, and sends another event for the same session: no more credits.
    assert deliver(event).json() == {"outcome": "replayed"}
    assert deliver(session_event(session, type="checkout.session.async_payment_succeeded")).json() == {
        "outcome": "ignored"
    }
    assert wallet_balance(user=user) == 500 * MICRO
    assert Transaction.objects.filter(kind="topup").count() == 1
    assert ledger_verify().consistent


def test_an_unpaid_or_unrelated_event_credits_nothing(stripe_api: StripeStandIn) -> None:
    user = make_user()
    topup = buy(user, 200)
    session = stripe_api.sessions[TopUp.objects.get(pk=topup["id"]).external_id]
    # Completed but not paid yet (a delayed payment method): wait for async_payment_succeeded.
    assert deliver(session_event(session, payment_status="unpaid")).json() == {"outcome": "ignored"}
    assert deliver(session_event({"id": "pi_1", "object": "payment_intent"}, type="payment_intent.created")).json() == {
        "outcome": "ignored"
    }
    assert wallet_balance(user=user) == 0
    # The session expires: the top-up ends, and a late "paid" for it is still checked and applied
    # only if it matches (Stripe does not complete an expired session; nothing else changes).
    assert deliver(session_event(session, type="checkout.session.expired", payment_status="unpaid")).json() == {
        "outcome": "applied"
    }
    assert TopUp.objects.get(pk=topup["id"]).state == "expired"


@pytest.mark.parametrize(
    "signature",
    [
        "",  # no header at all
        "t=1,v1=00",  # garbage
        "wrong-secret",
        "stale",  # right secret, signed an hour ago: a captured delivery replayed later
    ],
)
def test_a_webhook_without_stripes_signature_is_refused(stripe_api: StripeStandIn, signature: str) -> None:
    user = make_user()
    topup = buy(user)
    payload = session_event(stripe_api.sessions[TopUp.objects.get(pk=topup["id"]).external_id])
    if signature == "wrong-secret":
        signature = stripe_signature(payload, secret="whsec_attacker")
    elif signature == "stale":
        signature = stripe_signature(payload, timestamp=int(time.time()) - 3600)
    headers = {"HTTP_STRIPE_SIGNATURE": signature} if signature else {}
    response = client_for().post(WEBHOOK, data=payload, content_type="application/json", **headers)
    assert_error(response, 401, "bad_signature")
    assert wallet_balance(user=user) == 0 and not PaymentEvent.objects.exists()


def test_a_signed_body_changed_afterwards_is_refused(stripe_api: StripeStandIn) -> None:
    user = make_user()
    topup = buy(user, 100)
    session = stripe_api.sessions[TopUp.objects.get(pk=topup["id"]).external_id]
    signed = session_event(session, payment_status="unpaid", event_id="evt_x")
    tampered = signed.replace(b'"payment_status": "unpaid"', b'"payment_status": "paid"')
    assert tampered != signed
    assert_error(deliver(tampered, signature=stripe_signature(signed)), 401, "bad_signature")
    assert wallet_balance(user=user) == 0


def test_a_payment_of_another_amount_or_currency_is_refused(stripe_api: StripeStandIn) -> None:
    user = make_user()
    topup = buy(user, 1000)
    session = stripe_api.sessions[TopUp.objects.get(pk=topup["id"]).external_id]
    # Say someone changed the session's line item at Stripe, or paid in another currency: Stripe's
    # report is authentic, but it is not what this top-up asked for.
    assert_error(deliver(session_event(session, amount_total=1)), 400, "payment_mismatch")
    assert_error(deliver(session_event(session, currency="jpy")), 400, "payment_mismatch")
    assert wallet_balance(user=user) == 0 and TopUp.objects.get(pk=topup["id"]).state == "pending"
    assert not PaymentEvent.objects.exists()  # refused events are not recorded: a correct redelivery still applies
    assert deliver(session_event(session)).json() == {"outcome": "applied"}
    assert wallet_balance(user=user) == 1000 * MICRO


def test_an_unknown_session_or_another_users_session_credits_nobody(stripe_api: StripeStandIn) -> None:
    victim, attacker = make_user(), make_user()
    victim_topup, attacker_topup = buy(victim, 100), buy(attacker, 100)
    victim_session = stripe_api.sessions[TopUp.objects.get(pk=victim_topup["id"]).external_id]
    # A session this marketplace never created (made on the attacker's own Stripe account, say).
    stranger = {**victim_session, "id": "cs_test_not_ours"}
    assert_error(deliver(session_event(stranger)), 400, "payment_mismatch")
    # The victim's session, relabelled with the attacker's top-up as its reference.
    relabelled = session_event(victim_session, client_reference_id=str(attacker_topup["id"]))
    assert_error(deliver(relabelled), 400, "payment_mismatch")
    assert wallet_balance(user=attacker) == 0 and wallet_balance(user=victim) == 0
    # Nor can the attacker read the victim's top-up or pay it with the test provider.
    assert_error(client_for(attacker).get(f"/api/payments/topups/{victim_topup['id']}/"), 404, "not_found")
    assert [t["id"] for t in client_for(attacker).get("/api/payments/topups/").json()["results"]] == [
        attacker_topup["id"]
    ]


@pytest.mark.parametrize("credits", [0, -5, 99, 1_000_001, 10**12, "500", 2.5, True, None])
def test_top_up_amounts_outside_the_range_are_refused(stripe_api: StripeStandIn, credits: Any) -> None:
    user = make_user()
    response = client_for(user).post("/api/payments/topups/", {"credits": credits}, format="json")
    assert_error(response, 400, "invalid")
    assert not TopUp.objects.exists() and stripe_api.requests == []


def test_a_stripe_refusal_is_a_502_that_charges_nothing_and_a_retry_works(stripe_api: StripeStandIn) -> None:
    user = make_user()
    stripe_api.fail_with = 400
    response = client_for(user).post("/api/payments/topups/", {"credits": 300, "idempotency_key": "k"}, format="json")
    body = assert_error(response, 502, "payment_provider_error")
    assert "Stripe refused" in body["message"]
    stripe_api.fail_with = None
    again = buy(user, 300, idempotency_key="k")  # the same top-up, its checkout created this time
    assert again["checkout_url"].startswith("https://checkout.stripe.test/") and TopUp.objects.count() == 1


def test_a_key_reused_for_another_amount_is_a_conflict(stripe_api: StripeStandIn) -> None:
    user = make_user()
    buy(user, 300, idempotency_key="same")
    response = client_for(user).post(
        "/api/payments/topups/", {"credits": 301, "idempotency_key": "same"}, format="json"
    )
    assert_error(response, 409, "idempotency_conflict")


def test_without_a_payment_provider_top_ups_say_what_to_configure(settings: Any) -> None:
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", False
    response = client_for(make_user()).post("/api/payments/topups/", {"credits": 500}, format="json")
    body = assert_error(response, 503, "payments_unavailable")
    assert "HIVEMART_STRIPE_SECRET_KEY" in body["message"]
    # And the webhook of an unconfigured provider accepts nothing.
    assert_error(deliver(b"{}"), 503, "payments_unavailable")


# --- the test payment provider ----------------------------------------------------------------


def test_test_top_ups_pay_on_a_button_once_and_only_your_own(settings: Any) -> None:
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", True
    user, other = make_user(), make_user()
    topup = buy(user, 250)
    assert topup["provider"] == "test"
    assert topup["checkout_url"] == f"http://testserver/wallet/topups/{topup['id']}/pay/"
    pay = f"/api/payments/topups/{topup['id']}/test-pay/"
    assert_error(client_for(other).post(pay), 404, "not_found")
    assert client_for(user).post(pay).json()["state"] == "paid"
    assert client_for(user).post(pay).json()["state"] == "paid"  # a second click credits nothing more
    assert wallet_balance(user=user) == 250 * MICRO and wallet_balance(user=other) == 0
    # Switched off (production), the button is refused even for a top-up made while it was on.
    settings.HIVEMART_TEST_TOPUPS = False
    topup2 = TopUp.objects.create(user=user, provider="test", credits=MICRO, amount_minor=1, currency="usd")
    assert_error(client_for(user).post(f"/api/payments/topups/{topup2.pk}/test-pay/"), 503, "payments_unavailable")
    assert wallet_balance(user=user) == 250 * MICRO


def _settings_in_a_fresh_process(**env: str) -> dict:
    code = (
        "import json, marketplace.settings as s; "
        "print(json.dumps({'test': s.HIVEMART_TEST_TOPUPS, 'stripe': bool(s.HIVEMART_STRIPE_SECRET_KEY)}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HIVEMART_", "DEBUG"))}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "PYTHONPATH": str(ROOT), "SECRET_KEY": "x" * 50, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_test_top_ups_are_off_in_production_unless_explicitly_enabled() -> None:
    assert _settings_in_a_fresh_process() == {"test": False, "stripe": False}
    assert _settings_in_a_fresh_process(DEBUG="true") == {"test": True, "stripe": False}
    assert _settings_in_a_fresh_process(HIVEMART_TEST_TOPUPS="true") == {"test": True, "stripe": False}
    from hivemart.demo.scenario import market_env

    assert _settings_in_a_fresh_process(**market_env())["test"] is True  # the embedded demo needs no account anywhere
    # A Stripe key without the webhook's secret could never credit a payment: refused at start-up.
    code = "import marketplace.settings"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIVEMART_", "DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), SECRET_KEY="x" * 50, HIVEMART_STRIPE_SECRET_KEY="sk_x")
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "HIVEMART_STRIPE_WEBHOOK_SECRET" in refused.stderr
    stripe_env = {"HIVEMART_STRIPE_SECRET_KEY": "sk_x", "HIVEMART_STRIPE_WEBHOOK_SECRET": "whsec_x", "DEBUG": "true"}
    assert _settings_in_a_fresh_process(**stripe_env) == {"test": False, "stripe": True}


# --- payouts ---------------------------------------------------------------------------------


def earning_provider(amount: int) -> Provider:
    """A provider whose earnings account holds ``amount`` micro-credits (paid through a real capture)."""
    provider = make_provider()
    payer = wallet_get_or_create(user=make_user())
    credit_grant(account=payer, amount=amount, memo="test funds")
    hold = hold_place(account=payer, amount=amount)
    hold_capture(
        hold=hold, amount=amount, payee=provider.earnings_account, idempotency_key=f"earn-{provider.pk}", fee=0
    )
    provider.earnings_account.refresh_from_db()
    return provider


def balance(account_id: int) -> int:
    return Account.objects.get(pk=account_id).balance


@pytest.fixture
def staff() -> User:
    return make_user(is_staff=True)


def test_a_payout_request_holds_the_amount_until_staff_approve_and_mark_it_paid(staff: User) -> None:
    provider = earning_provider(5_000_000)
    owner, earnings = provider.user, provider.earnings_account_id
    response = client_for(owner).post(
        "/api/payouts/", {"provider": provider.pk, "amount": 3_000_000, "memo": "May"}, format="json"
    )
    assert response.status_code == 201, response.json()
    request = response.json()
    assert request["state"] == "requested" and request["amount"] == 3_000_000
    held = PayoutRequest.objects.get(pk=request["id"]).hold_account_id
    assert balance(earnings) == 2_000_000 and balance(held) == 3_000_000  # set aside: not spendable twice

    approved = client_for(staff).post(f"/api/payouts/{request['id']}/approve/", {"note": "ok"}, format="json")
    assert approved.status_code == 200 and approved.json()["state"] == "approved"
    assert balance(held) == 0 and balance(earnings) == 2_000_000
    paid_out = Transaction.objects.get(kind="payout", postings__account_id=held)
    assert {p.account.kind: p.amount for p in paid_out.postings.all()} == {"escrow": -3_000_000, "external": 3_000_000}

    paid = client_for(staff).post(f"/api/payouts/{request['id']}/paid/", {"reference": "SEPA-42"}, format="json")
    assert paid.json()["state"] == "paid" and paid.json()["note"] == "SEPA-42"
    mine = client_for(owner).get("/api/payouts/").json()["results"]
    assert [(r["id"], r["state"]) for r in mine] == [(request["id"], "paid")]
    assert ledger_verify().consistent


def test_approving_twice_pays_once_and_decided_requests_stay_decided(staff: User) -> None:
    provider = earning_provider(2_000_000)
    request = payout_request_create(user=provider.user, provider_id=provider.pk, amount=2_000_000)
    payout_approve(request_id=request.pk, by=staff)
    payout_approve(request_id=request.pk, by=staff)
    assert Transaction.objects.filter(kind="payout").count() == 1
    with pytest.raises(InvalidTransition):
        payout_reject(request_id=request.pk, by=staff)  # the credits have left: nothing to give back
    payout_mark_paid(request_id=request.pk, by=staff, reference="wire 1")
    assert payout_approve(request_id=request.pk, by=staff).state == "paid"  # a late second approval changes nothing
    assert Transaction.objects.filter(kind="payout").count() == 1


def test_rejecting_returns_the_credits_and_cannot_be_approved_after(staff: User) -> None:
    provider = earning_provider(1_000_000)
    request = payout_request_create(user=provider.user, provider_id=provider.pk, amount=600_000)
    assert balance(provider.earnings_account_id) == 400_000
    response = client_for(staff).post(
        f"/api/payouts/{request.pk}/reject/", {"note": "bank details missing"}, format="json"
    )
    assert response.json()["state"] == "rejected" and response.json()["note"] == "bank details missing"
    payout_reject(request_id=request.pk, by=staff)  # again: nothing more moves
    assert balance(provider.earnings_account_id) == 1_000_000
    assert Transaction.objects.filter(kind="payout_release").count() == 1
    assert_error(client_for(staff).post(f"/api/payouts/{request.pk}/approve/"), 409, "invalid_state")
    with pytest.raises(InvalidTransition):
        payout_mark_paid(request_id=request.pk, by=staff, reference="x")
    assert Transaction.objects.filter(kind="payout").count() == 0


def test_a_payout_beyond_the_earnings_is_refused_and_moves_nothing() -> None:
    provider = earning_provider(1_000_000)
    owner = provider.user
    body = assert_error(
        client_for(owner).post("/api/payouts/", {"provider": provider.pk, "amount": 1_000_001}, format="json"),
        402,
        "insufficient_credits",
    )
    assert body["extra"]["available"] == 1_000_000
    payout_request_create(user=owner, provider_id=provider.pk, amount=700_000)
    # What an earlier request holds is not available to a second one.
    with pytest.raises(InsufficientCredits):
        payout_request_create(user=owner, provider_id=provider.pk, amount=700_000)
    assert balance(provider.earnings_account_id) == 300_000 and PayoutRequest.objects.count() == 1


@pytest.mark.parametrize("amount", [0, -1, 10**16, "5", 1.5, True])
def test_payout_amounts_that_are_not_positive_micro_credits_are_refused(amount: Any) -> None:
    provider = earning_provider(1_000_000)
    response = client_for(provider.user).post(
        "/api/payouts/", {"provider": provider.pk, "amount": amount}, format="json"
    )
    assert_error(response, 400, "invalid")
    assert balance(provider.earnings_account_id) == 1_000_000


def test_nobody_but_the_owner_requests_and_nobody_but_staff_decides() -> None:
    provider = earning_provider(1_000_000)
    stranger = make_user()
    response = client_for(stranger).post("/api/payouts/", {"provider": provider.pk, "amount": 1}, format="json")
    assert_error(response, 404, "not_found")
    request = payout_request_create(user=provider.user, provider_id=provider.pk, amount=500_000)
    for who in (provider.user, stranger):
        for action in ("approve", "reject", "paid"):
            assert_error(client_for(who).post(f"/api/payouts/{request.pk}/{action}/"), 403, "permission_denied")
        with pytest.raises(PermissionDenied):
            payout_approve(request_id=request.pk, by=who)
    assert_error(client_for(stranger).get(f"/api/payouts/{request.pk}/"), 404, "not_found")
    assert PayoutRequest.objects.get(pk=request.pk).state == "requested"
    assert balance(request.hold_account_id) == 500_000


def test_a_retried_payout_request_is_one_request() -> None:
    provider = earning_provider(1_000_000)
    body = {"provider": provider.pk, "amount": 400_000, "idempotency_key": "may-payout"}
    first = client_for(provider.user).post("/api/payouts/", body, format="json").json()
    again = client_for(provider.user).post("/api/payouts/", body, format="json").json()
    assert first["id"] == again["id"] and balance(provider.earnings_account_id) == 600_000
    other = {**body, "amount": 1}
    assert_error(client_for(provider.user).post("/api/payouts/", other, format="json"), 409, "idempotency_conflict")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_payout_requests_cannot_take_the_same_earnings_twice() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    provider = earning_provider(1_000_000)
    barrier = threading.Barrier(6)

    def ask(i: int) -> object:
        try:
            barrier.wait()
            return payout_request_create(user=provider.user, provider_id=provider.pk, amount=600_000)
        except Exception as e:  # noqa: BLE001 - asserted on below
            return e
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    made = [r for r in results if isinstance(r, PayoutRequest)]
    assert len(made) == 1, results
    assert all(isinstance(r, InsufficientCredits) for r in results if r not in made)
    assert balance(provider.earnings_account_id) == 400_000
    assert ledger_verify().consistent


# --- the ledger movements underneath -------------------------------------------------------------


def test_ledger_money_movements_are_keyed_and_refuse_a_second_different_use() -> None:
    from marketplace.common.errors import Conflict, IdempotencyConflict
    from marketplace.ledger.services import payout_hold_pay, payout_hold_place, payout_hold_release, topup_credit

    wallet = wallet_get_or_create(user=make_user())
    first = topup_credit(account=wallet, amount=500, idempotency_key="topup:x")
    assert topup_credit(account=wallet, amount=500, idempotency_key="topup:x").pk == first.pk
    with pytest.raises(IdempotencyConflict):
        topup_credit(account=wallet, amount=501, idempotency_key="topup:x")
    assert balance(wallet.pk) == 500

    provider = earning_provider(1_000)
    escrow, held = payout_hold_place(
        source=provider.earnings_account, amount=600, idempotency_key="h", requested_by=provider.user
    )
    again, held_again = payout_hold_place(
        source=provider.earnings_account, amount=600, idempotency_key="h", requested_by=provider.user
    )
    assert (again.pk, held_again.pk) == (escrow.pk, held.pk) and balance(provider.earnings_account_id) == 400
    with pytest.raises(IdempotencyConflict):
        payout_hold_place(source=provider.earnings_account, amount=1, idempotency_key="h", requested_by=provider.user)
    paid = payout_hold_pay(escrow=escrow, idempotency_key="p", decided_by=None)
    assert payout_hold_pay(escrow=escrow, idempotency_key="p", decided_by=None).pk == paid.pk
    with pytest.raises(Conflict):  # emptied: nothing left to pay again or to give back
        payout_hold_release(escrow=escrow, to=provider.earnings_account, idempotency_key="r", decided_by=None)
    with pytest.raises(Conflict):
        payout_hold_pay(escrow=escrow, idempotency_key="p2", decided_by=None)
    assert balance(escrow.pk) == 0 and balance(provider.earnings_account_id) == 400
    assert ledger_verify().consistent


def test_staff_decide_payout_requests_in_the_admin(staff: User) -> None:
    from django.test import Client

    provider = earning_provider(2_000_000)
    keep = payout_request_create(user=provider.user, provider_id=provider.pk, amount=500_000)
    drop = payout_request_create(user=provider.user, provider_id=provider.pk, amount=700_000)
    admin = Client()
    staff.is_superuser = True
    staff.save()
    admin.force_login(staff)
    url = "/admin/payments/payoutrequest/"
    assert admin.get(url).status_code == 200
    admin.post(url, {"action": "approve", "_selected_action": [keep.pk]})
    admin.post(url, {"action": "reject", "_selected_action": [drop.pk]})
    admin.post(url, {"action": "reject", "_selected_action": [keep.pk]})  # too late: approved; an error message
    states = dict(PayoutRequest.objects.values_list("pk", "state"))
    assert states == {keep.pk: "approved", drop.pk: "rejected"}
    assert balance(provider.earnings_account_id) == 1_500_000
    # Nothing in the admin edits a request or a top-up by hand.
    assert admin.get(f"{url}add/").status_code == 403
    assert admin.post(f"{url}{keep.pk}/change/", {"state": "requested"}).status_code == 403
