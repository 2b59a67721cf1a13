"""Money in and out in a real browser (Playwright driving Debian's chromium, as test_browser.py).

1. A visitor signs up, buys credits on the wallet page through the test payment provider's
   checkout page, then a job paid from those credits runs and settles (through the real
   services, as in test_browser.py); the job page shows the receipt and the charge, the
   wallet the rest.
2. A provider's operator reads the Sell page, earns (a real capture into their provider's
   earnings), asks for a payout on the wallet page, and sees staff's decision, made on the
   staff payouts page in a second browser session.

Each step is shot at a desktop (1280x800) and a phone (390x844) width into
``$HIVEMART_SCREENS_DIR`` (default ``test-artifacts/web/money/``).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.web.test_browser import ARTIFACTS, PASSWORD, WAIT_MS, _browser_or_skip, balance_micro, in_thread

SCREENS = Path(os.environ.get("HIVEMART_SCREENS_DIR") or ARTIFACTS / "money")
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}
TOPUP_CREDITS = 500
BUDGET, PRICE, UNITS = 2_000_000, 10_000, 75_000_000
CHARGE = UNITS * PRICE // 1_000_000

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def shots(page: Any, name: str) -> None:
    """Screenshots of the current page at each width (full page), then back to the desktop width."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(SCREENS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def no_horizontal_scroll(page: Any) -> None:
    """At the phone width the page itself does not scroll sideways (wide tables scroll in their box)."""
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    page.set_viewport_size({"width": 1280, "height": 800})
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"


def sign_up(page: Any, base: str, username: str) -> None:
    page.goto(f"{base}/signup/")
    page.fill("#id_username", username)
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/keys/")


def test_sign_up_top_up_run_a_job_and_see_receipt_and_wallet(live_server: Any, settings: Any, tmp_path: Path) -> None:
    chromium = _browser_or_skip()
    from django.utils import timezone
    from playwright.sync_api import expect, sync_playwright

    from hivemart_core.protocol.identity import Identity
    from hivemart_core.protocol.receipts import ReceiptCounter, countersign
    from hivemart_core.protocol.tickets import JobTicket
    from marketplace.accounts.models import User
    from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store, job_transition
    from marketplace.providers.services import provider_heartbeat
    from marketplace.receipts.services import job_finish, receipts_settle
    from tests.marketplace.factories import make_model, make_user, register
    from tests.marketplace.settlement import platform_key_file

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", True
    provider_identity, client_identity = Identity.generate(), Identity.generate()
    base = live_server.url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(WAIT_MS)
            sign_up(page, base, "buyer")

            # An empty wallet offers to buy credits; the test provider's page takes the payment.
            page.goto(f"{base}/wallet/")
            assert balance_micro(page) == 0
            expect(page.locator("#topup")).to_contain_text("test payment provider")
            shots(page, "10-wallet-empty")
            no_horizontal_scroll(page)
            page.fill("#topup-credits", str(TOPUP_CREDITS))
            page.click("button[name=buy]")
            expect(page).to_have_url(re.compile(r"/wallet/topups/\d+/pay/$"))
            expect(page.locator("#topup-credits")).to_have_attribute("data-micro", str(TOPUP_CREDITS * 1_000_000))
            shots(page, "11-test-checkout")
            page.click("button[name=pay]")
            expect(page).to_have_url(f"{base}/wallet/")
            expect(page.locator(".message")).to_contain_text("Test payment done")
            assert balance_micro(page) == TOPUP_CREDITS * 1_000_000
            expect(page.locator("#topups")).to_contain_text("paid")
            expect(page.locator("#postings")).to_contain_text("topup")
            shots(page, "12-wallet-topped-up")

            # A job paid from the bought credits runs and settles through the real services.
            def run_job() -> int:
                user = User.objects.get(username="buyer")
                model = make_model(num_blocks=4)
                provider = register(
                    user=make_user(), identity=provider_identity, model=model, price=PRICE, name="money-gpu"
                )
                provider_heartbeat(provider=provider, state="online", throughput=1000.0, latency_ms=20.0)
                job, _ = job_create(
                    user=user,
                    kind="inference",
                    model_id=model.model_id,
                    budget=BUDGET,
                    max_price=PRICE,
                    idempotency_key="money-job",
                    client_key=client_identity.public_key.hex(),
                )
                job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=4, provider=provider)])
                job_transition(job=job, to_state="running", reason="client started")
                return job.pk

            job_id = in_thread(run_job)

            def settle() -> None:
                from marketplace.jobs.models import Job
                from marketplace.receipts.models import Ticket

                job = Job.objects.get(pk=job_id)
                ticket = Ticket.objects.filter(job=job, role="primary").latest("id")
                counter = ReceiptCounter(JobTicket.from_dict(ticket.signed), "money-session-1")
                counter.record(UNITS, os.urandom(32))
                receipt = countersign(counter.receipt(provider_identity), client_identity)
                _, outcomes = job_finish(job=job, by=job.user, receipts=[receipt.to_dict()])
                assert [o.status for o in outcomes] == ["accepted"], outcomes
                grace = timedelta(seconds=settings.HIVEMART_SETTLE_GRACE_S + 1)
                assert receipts_settle(job_ids=[job_id], now=timezone.now() + grace).closed == [job_id]

            in_thread(settle)
            page.goto(f"{base}/jobs/{job_id}/")
            expect(page.locator("#job-state")).to_have_text("done")
            expect(page.locator("#receipts")).to_contain_text(str(UNITS))
            assert int(page.locator("#cost-captured").get_attribute("data-micro")) == CHARGE
            shots(page, "13-job-receipt")
            no_horizontal_scroll(page)

            page.goto(f"{base}/wallet/")
            assert balance_micro(page) == TOPUP_CREDITS * 1_000_000 - CHARGE
            expect(page.locator("#postings")).to_contain_text("release")
            shots(page, "14-wallet-after-job")
        finally:
            browser.close()


def test_sell_earn_and_request_a_payout_that_staff_approve(live_server: Any, settings: Any) -> None:
    chromium = _browser_or_skip()
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", True
    from playwright.sync_api import expect, sync_playwright

    from marketplace.accounts.models import User
    from marketplace.accounts.services import user_create
    from tests.marketplace.factories import make_provider
    from tests.marketplace.test_payments import earning_provider

    base = live_server.url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(WAIT_MS)
            sign_up(page, base, "seller")
            page.goto(f"{base}/sell/")
            shots(page, "20-sell")

            # The agent registers the provider (as `hivemart-provider run` does) and it earns.
            def earn() -> int:
                seller = User.objects.get(username="seller")
                earned = earning_provider(4_000_000)
                # Hand the earning provider to the seller: earnings_provider made it for a new user.
                from marketplace.ledger.models import Account
                from marketplace.providers.models import Provider

                Provider.objects.filter(pk=earned.pk).update(user=seller, name="seller-gpu")
                Account.objects.filter(pk=earned.earnings_account_id).update(user=seller)
                make_provider(user=seller, name="idle-gpu")  # one with nothing to pay out
                return earned.pk

            provider_id = in_thread(earn)
            page.goto(f"{base}/wallet/")
            expect(page.locator("#earnings")).to_contain_text("seller-gpu")
            expect(page.locator("#earnings")).to_contain_text("4.00")
            shots(page, "21-wallet-earnings")
            no_horizontal_scroll(page)

            # Too much is refused with the available amount; a fair request is held.
            expect(page.locator("#payout-provider option")).to_have_count(1)  # idle-gpu has nothing to pay out
            page.select_option("#payout-provider", str(provider_id))
            page.fill("#payout-amount", "5")
            page.click("button[name=payout]")
            expect(page.locator(".message.error")).to_contain_text("available")
            page.fill("#payout-amount", "2.5")
            page.click("button[name=payout]")
            expect(page.locator(".message")).to_contain_text("Payout request #")
            expect(page.locator("#payout-requests")).to_contain_text("requested")
            expect(page.locator("#earnings")).to_contain_text("1.50")
            shots(page, "22-payout-requested")

            # Staff approve it on their page, in a session of their own.
            in_thread(lambda: user_create(username="staffer", password=PASSWORD, is_staff=True))
            staff = browser.new_page(viewport={"width": 1280, "height": 800})
            staff.set_default_timeout(WAIT_MS)
            staff.goto(f"{base}/login/?next=/staff/payouts/")
            staff.fill("#id_username", "staffer")
            staff.fill("#id_password", PASSWORD)
            staff.click("button[type=submit]")
            expect(staff.locator("#staff-payouts")).to_contain_text("seller")
            shots(staff, "23-staff-payouts")
            staff.click("button[name=approve]")
            expect(staff.locator(".message")).to_contain_text("approve done")
            staff.fill("input[name=note]", "SEPA 2026-12-07")
            staff.click("button[name=paid]")
            expect(staff.locator("#staff-payouts")).to_contain_text("Nothing to decide")

            page.reload()
            expect(page.locator("#payout-requests")).to_contain_text("paid")
            expect(page.locator("#payout-requests")).to_contain_text("SEPA 2026-12-07")
            shots(page, "24-payout-paid")
        finally:
            browser.close()
