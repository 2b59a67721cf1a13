"""The API docs (Swagger UI, ReDoc) and the pages in a real browser under the site's
Content-Security-Policy: they render, the browser reports no policy violation, and every
request stays on the site (no CDN). Chromium as in test_browser.py (skipped without it,
except in CI)."""

from __future__ import annotations

import pytest

from tests.web.test_browser import WAIT_MS, _browser_or_skip

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_api_docs_and_pages_render_under_the_csp_from_this_site_only(live_server) -> None:  # noqa: ANN001
    chromium = _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    base = live_server.url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            violations: list[str] = []
            elsewhere: list[str] = []
            page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
            page.on("pageerror", lambda e: violations.append(str(e)))
            # A response from elsewhere: a request that left the site (the policy blocks before sending).
            page.on(
                "response", lambda r: None if r.url.startswith((base, "data:", "blob:")) else elsewhere.append(r.url)
            )

            page.goto(f"{base}/api/docs/")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("Hivemart marketplace API")
            expect(page.locator(".swagger-ui .opblock").first).to_be_visible()

            page.goto(f"{base}/api/redoc/")
            expect(page.locator("h1").first).to_contain_text("Hivemart marketplace API", timeout=WAIT_MS)

            for path in ("/", "/providers/", "/sell/", "/login/", "/signup/"):
                page.goto(f"{base}{path}")
                expect(page.locator("main, body").first).to_be_visible()
                # The one stylesheet applied (a blocked style-src would leave the default font).
                assert page.evaluate("getComputedStyle(document.body).fontFamily") != '"Times New Roman"'
            # ReDoc's footer always asks for Redocly's logo from their CDN: the policy blocks it (no
            # request leaves the site) and ReDoc hides the broken image. Nothing else may be blocked.
            assert not [v for v in violations if "cdn.redoc.ly/redoc/logo-mini.svg" not in v], violations
            assert not elsewhere, elsewhere
        finally:
            browser.close()
