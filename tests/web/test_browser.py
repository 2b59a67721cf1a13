"""The web marketplace in a real browser: Playwright driving Debian's ``chromium`` package.

A visitor signs up, creates an API key (read from the page), logs out and in again; then a
job for that user is created and planned through the real services, its provider's signed
work receipt is uploaded and settled (``marketplace.receipts``), and the browser watches the
job page (it reloads itself until the job ends) and the wallet balance change. Screenshots go to ``test-artifacts/web/``.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (or
``$HIVEMART_CHROMIUM``). Without it the test is skipped, except in CI (``CI=true``), where
a missing browser is a failure (``scripts/test`` installs it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

T = TypeVar("T")

CHROMIUM = Path(os.environ.get("HIVEMART_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PASSWORD = "correct horse battery staple"
GRANT, BUDGET = 5_000_000, 2_000_000
PRICE = 10_000  # micro-credits per million work units
UNITS = 75_000_000  # work units the provider's receipt claims
CHARGE = UNITS * PRICE // 1_000_000  # 750_000 micro-credits: what settlement must capture
# Waits for the page, not assertions about speed: generous so a loaded machine still passes.
WAIT_MS = 30_000

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _browser_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"no chromium at {CHROMIUM} (apt-get install chromium, or set HIVEMART_CHROMIUM)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` (database work) in a plain thread: Playwright's sync API keeps an asyncio loop
    on this one, and Django refuses ORM calls from a thread with a running loop."""
    from django.db import connections

    def call() -> T:
        try:
            return fn()
        finally:
            connections.close_all()  # this thread's connections, or the test database cannot be dropped

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def shot(page, name: str) -> None:  # noqa: ANN001
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def balance_micro(page) -> int:  # noqa: ANN001
    return int(page.locator("#balance").get_attribute("data-micro"))


def test_sign_up_create_a_key_and_watch_a_job_settle(live_server, settings, tmp_path: Path) -> None:  # noqa: ANN001
    chromium = _browser_or_skip()
    from django.utils import timezone
    from playwright.sync_api import expect, sync_playwright

    from hivemart_core.protocol.identity import Identity
    from hivemart_core.protocol.receipts import ReceiptCounter, countersign
    from hivemart_core.protocol.tickets import JobTicket
    from marketplace.accounts.models import User
    from marketplace.accounts.services import api_key_authenticate
    from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store, job_transition
    from marketplace.ledger.services import credit_grant, wallet_get_or_create
    from marketplace.providers.services import provider_heartbeat
    from marketplace.receipts.services import job_finish, receipts_settle
    from tests.marketplace.factories import make_model, make_user, register
    from tests.marketplace.settlement import platform_key_file

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    provider_identity, client_identity = Identity.generate(), Identity.generate()

    base = live_server.url
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(WAIT_MS)

            # Sign up: the form logs the new user in and lands on the API keys page.
            page.goto(f"{base}/signup/")
            page.fill("#id_username", "browser-user")
            page.fill("#id_email", "browser@example.org")
            page.fill("#id_password1", PASSWORD)
            page.fill("#id_password2", PASSWORD)
            shot(page, "01-signup")
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base}/keys/")
            expect(page.locator("header .who")).to_contain_text("browser-user")

            # Create a key; it is on the page once, and it authenticates against the API.
            page.fill("#id_name", "from the browser")
            page.click("button[name=create]")
            raw = page.locator("#new-key").inner_text().strip()
            assert re.fullmatch(r"hm_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", raw)
            shot(page, "02-key-created")
            key = in_thread(lambda: api_key_authenticate(raw=raw))
            assert key.name == "from the browser" and key.user.username == "browser-user"
            me = httpx.get(f"{base}/api/me/", headers={"Authorization": f"Bearer {raw}"}, timeout=30)
            assert me.status_code == 200 and me.json()["username"] == "browser-user"
            page.goto(f"{base}/keys/")
            expect(page.locator("#keys")).to_contain_text(raw[3:15])
            assert raw not in page.content()

            # Log out and back in.
            page.click("header .who button")
            expect(page.locator("header .who")).to_contain_text("Log in")
            page.goto(f"{base}/wallet/")
            expect(page).to_have_url(re.compile(r"/login/\?next=/wallet/$"))
            page.fill("#id_username", "browser-user")
            page.fill("#id_password", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base}/wallet/")
            assert balance_micro(page) == 0

            # Credits arrive and a job is created, planned (which issues signed tickets) and
            # started, all through the real services.
            def start_job() -> tuple[int, int]:
                user = User.objects.get(username="browser-user")
                credit_grant(account=wallet_get_or_create(user=user), amount=GRANT, memo="browser test grant")
                model = make_model(num_blocks=4)
                provider = register(
                    user=make_user(), identity=provider_identity, model=model, price=PRICE, name="browser-gpu"
                )
                provider_heartbeat(provider=provider, state="online", throughput=1000.0, latency_ms=20.0)
                job, _ = job_create(
                    user=user,
                    kind="inference",
                    model_id=model.model_id,
                    budget=BUDGET,
                    max_price=PRICE,
                    idempotency_key="browser-job",
                    client_key=client_identity.public_key.hex(),
                )
                job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=4, provider=provider)])
                job_transition(job=job, to_state="running", reason="client started")
                return job.pk, provider.pk

            job_id, provider_id = in_thread(start_job)
            page.reload()
            assert balance_micro(page) == GRANT - BUDGET  # the budget is held
            expect(page.locator("#postings")).to_contain_text("browser test grant")
            shot(page, "03-wallet-with-hold")

            page.goto(f"{base}/jobs/")
            page.click(f"a[href='/jobs/{job_id}/']")
            expect(page.locator("#job-state")).to_have_text("running")
            expect(page.locator("#plan")).to_contain_text("browser-gpu")
            assert int(page.locator("#cost-captured").get_attribute("data-micro")) == 0
            shot(page, "04-job-running")

            # The provider signs a receipt for its work (as its agent does), the client
            # countersigns it and finishes the job; settlement pays the provider and closes
            # the job, while the browser watches (the page reloads itself until the job ends).
            def settle() -> int:
                from marketplace.jobs.models import Job
                from marketplace.receipts.models import Ticket

                job = Job.objects.get(pk=job_id)
                ticket = Ticket.objects.filter(job=job, provider_id=provider_id, role="primary").latest("id")
                counter = ReceiptCounter(JobTicket.from_dict(ticket.signed), "browser-session-1")
                counter.record(UNITS, os.urandom(32))
                receipt = countersign(counter.receipt(provider_identity), client_identity)
                _, outcomes = job_finish(job=job, by=job.user, receipts=[receipt.to_dict()])
                assert [o.status for o in outcomes] == ["accepted"]
                grace = timedelta(seconds=settings.HIVEMART_SETTLE_GRACE_S + 1)
                summary = receipts_settle(job_ids=[job_id], now=timezone.now() + grace)
                assert summary.closed == [job_id]
                return summary.captured

            captured = in_thread(settle)
            assert captured == CHARGE
            expect(page.locator("#job-state")).to_have_text("done", timeout=WAIT_MS)
            assert int(page.locator("#cost-captured").get_attribute("data-micro")) == CHARGE
            # The same held/spent/refunded as the API's (and so `hivemart jobs show`): nothing held once done.
            assert int(page.locator("#cost-held").get_attribute("data-micro")) == 0
            assert int(page.locator("#cost-refunded").get_attribute("data-micro")) == BUDGET - CHARGE
            expect(page.locator("#receipts")).to_contain_text(str(UNITS))
            expect(page.locator("#settlements")).to_contain_text("browser-gpu")
            expect(page.locator("#charges")).to_contain_text("browser-gpu")
            shot(page, "05-job-settled")

            page.goto(f"{base}/wallet/")
            assert balance_micro(page) == GRANT - CHARGE  # the unspent part of the hold came back
            expect(page.locator("#postings")).to_contain_text("release")
            shot(page, "06-wallet-after-settlement")
        finally:
            browser.close()
