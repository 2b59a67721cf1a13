"""The wallet's money controls on the server-rendered pages: buying credits (the test payment
provider's checkout page; Stripe's redirect), asking for a payout, and the staff page that
decides payout requests. The rules themselves are tested in tests/marketplace/test_payments.py;
these check that the pages reach them and refuse what they refuse."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from marketplace.accounts.services import user_create
from marketplace.ledger.selectors import wallet_balance
from marketplace.payments.models import PayoutRequest, TopUp
from tests.marketplace.factories import make_user
from tests.marketplace.stripe_standin import SECRET_KEY, WEBHOOK_SECRET, StripeStandIn
from tests.marketplace.test_payments import earning_provider

pytestmark = pytest.mark.django_db
MICRO = 1_000_000


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def test_topups(settings: Any) -> None:
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", True


def test_a_test_top_up_from_the_wallet_page(test_topups: None) -> None:
    user = user_create(username="buyer", password=None)
    page = logged_in(user)
    wallet = page.get("/wallet/").content.decode()
    assert 'id="topup-credits"' in wallet and "test payment provider" in wallet
    assert "100 credits cost 1.00 USD; 100 to 1,000,000 credits at a time" in wallet
    response = page.post("/wallet/topups/", {"credits": "300"})
    topup = TopUp.objects.get(user=user)
    assert response.status_code == 302 and response["Location"] == f"/wallet/topups/{topup.pk}/pay/"
    checkout = page.get(response["Location"]).content.decode()
    assert "Pay (test)" in checkout and "300.00" in checkout and "3.00 USD" in checkout
    assert wallet_balance(user=user) == 0
    paid = page.post(response["Location"], follow=True)
    assert wallet_balance(user=user) == 300 * MICRO
    html = paid.content.decode()
    assert "Test payment done" in html and 'id="topups"' in html and "topup-paid" in html
    # Another user cannot see or pay it; a second payment credits nothing.
    other = logged_in(make_user())
    assert other.get(f"/wallet/topups/{topup.pk}/pay/").status_code == 404
    assert other.post(f"/wallet/topups/{topup.pk}/pay/").status_code == 404
    page.post(f"/wallet/topups/{topup.pk}/pay/")
    assert wallet_balance(user=user) == 300 * MICRO


@pytest.mark.parametrize("credits", ["0", "-1", "abc", "1.5", "99999999999"])
def test_bad_top_up_amounts_come_back_as_a_message(test_topups: None, credits: str) -> None:
    page = logged_in(make_user())
    html = page.post("/wallet/topups/", {"credits": credits}, follow=True).content.decode()
    assert "Top-up:" in html and not TopUp.objects.exists()


def test_without_a_payment_provider_the_wallet_says_so(settings: Any) -> None:
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", False
    page = logged_in(make_user())
    html = page.get("/wallet/").content.decode()
    assert "Top-ups are not set up" in html and 'id="topup-credits"' not in html
    assert "not configured" in page.post("/wallet/topups/", {"credits": "300"}, follow=True).content.decode()


def test_a_stripe_top_up_redirects_to_stripes_checkout(settings: Any) -> None:
    standin = StripeStandIn().start()
    try:
        settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_STRIPE_WEBHOOK_SECRET = SECRET_KEY, WEBHOOK_SECRET
        settings.HIVEMART_STRIPE_API_BASE, settings.HIVEMART_TEST_TOPUPS = standin.url, False
        response = logged_in(make_user()).post("/wallet/topups/", {"credits": "500"})
        assert response.status_code == 302 and response["Location"].startswith("https://checkout.stripe.test/c/pay/cs_")
        assert standin.requests[0]["form"]["success_url"] == "http://testserver/wallet/?topup=done"
    finally:
        standin.stop()


def test_a_payout_request_from_the_wallet_and_its_decision_on_the_staff_page() -> None:
    provider = earning_provider(2_500_000)
    owner = logged_in(provider.user)
    html = owner.get("/wallet/").content.decode()
    assert "Request payout" in html
    done = owner.post("/wallet/payouts/", {"provider": provider.pk, "amount": "1.5"}, follow=True).content.decode()
    request = PayoutRequest.objects.get()
    assert request.amount == 1_500_000 and "Payout request #" in done and "payout-requested" in done
    # Beyond the earnings, or someone else's provider: a message, nothing held.
    assert (
        "available"
        in owner.post("/wallet/payouts/", {"provider": provider.pk, "amount": "5"}, follow=True).content.decode()
    )
    stranger = logged_in(make_user())
    assert (
        "no provider"
        in stranger.post("/wallet/payouts/", {"provider": provider.pk, "amount": "1"}, follow=True).content.decode()
    )
    assert PayoutRequest.objects.count() == 1

    # Only staff see the staff page or decide.
    assert owner.get("/staff/payouts/").status_code == 403
    assert owner.post(f"/staff/payouts/{request.pk}/approve/").status_code == 403
    staff = logged_in(make_user(is_staff=True))
    assert f"#{request.pk}" in staff.get("/staff/payouts/").content.decode()
    staff.post(f"/staff/payouts/{request.pk}/approve/")
    staff.post(f"/staff/payouts/{request.pk}/paid/", {"note": "wire 77"})
    request.refresh_from_db()
    assert request.state == "paid" and request.note == "wire 77"
    html = owner.get("/wallet/").content.decode()
    assert "payout-paid" in html and "wire 77" in html
