"""Every web page through Django's test client: status codes, what each page shows, and who may see it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from django.urls import reverse

from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import api_key_authenticate, api_key_create, user_create
from marketplace.common.errors import AuthenticationFailed
from marketplace.jobs.services import SegmentSpec, job_charge, job_create, job_plan_store, job_transition
from marketplace.ledger.services import credit_grant, wallet_get_or_create
from marketplace.providers.services import provider_heartbeat, provider_measurement_record, providers_mark_stale
from tests.marketplace.factories import make_model, make_provider
from tests.web.sell_page import sell_argv, sell_env

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


def web_user(username: str = "alice", *, staff: bool = False):  # noqa: ANN201
    return user_create(username=username, password=PASSWORD, is_staff=staff)


def logged_in(user) -> Client:  # noqa: ANN001
    client = Client()
    client.force_login(user)
    return client


def funded(user, credits: int = 5_000_000) -> None:  # noqa: ANN001
    credit_grant(account=wallet_get_or_create(user=user), amount=credits, memo="test funds")


def settled_job(user, *, charge: int = 300_000):  # noqa: ANN001,ANN201
    """A job of ``user`` planned on one provider, charged ``charge`` and settled (done)."""
    model = make_model(num_blocks=4)
    provider = make_provider(model=model, price=1_000, name="gpu-box")
    job, _ = job_create(
        user=user,
        kind="inference",
        model_id=model.model_id,
        budget=1_000_000,
        max_price=5_000,
        idempotency_key=f"web-{user.pk}-{model.pk}",
    )
    job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=4, provider=provider)])
    job_transition(job=job, to_state="running", reason="client started")
    job_charge(job=job, provider=provider, amount=charge, idempotency_key="receipt-1")
    job_transition(job=job, to_state="settling")
    job_transition(job=job, to_state="done")
    job.refresh_from_db()
    return job, provider


# --- public pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web:overview", "web:providers", "web:sell", "web:signup", "web:login"])
def test_public_pages_render_for_anyone(name: str) -> None:
    response = Client().get(reverse(name))
    assert response.status_code == 200
    assert b"<html" in response.content and b"hivemart.css" in response.content


def test_overview_draws_coverage_per_block_and_lists_online_providers() -> None:
    model = make_model(num_blocks=6, name="Tiny Llama")
    make_provider(model=model, start=0, end=3, name="first-half")  # heartbeats 1000 units/s
    make_provider(model=model, start=1, end=3, name="middle")
    make_provider(model=model, start=3, end=6, online=False, name="sleeper")  # joining: not counted
    body = Client().get(reverse("web:overview")).content.decode()
    assert "Tiny Llama" in body and "<svg" in body
    # Blocks 0..2 have bars (block 0: one provider, blocks 1-2: two), blocks 3..5 are holes.
    assert body.count('class="bar"') == 3
    assert body.count('class="hole"') == 3
    assert "block 1: 2,000 tokens/s/block, 2 providers" in body
    assert "blocks 3, 4, 5 have no provider" in body
    assert "first-half" in body and "middle" in body
    online_section = body.split("Online providers", 1)[1]
    assert "sleeper" not in online_section


def test_overview_uses_measured_throughput_over_self_reported() -> None:
    model = make_model(num_blocks=2)
    provider = make_provider(model=model)  # self-reports 1000
    provider_measurement_record(provider=provider, throughput=250.0, latency_ms=30.0, success_rate=1.0)
    body = Client().get(reverse("web:overview")).content.decode()
    assert "block 0: 250.0 tokens/s/block, 1 provider" in body


def test_provider_list_and_page_show_price_throughput_and_uptime() -> None:
    model = make_model(num_blocks=4)
    provider = make_provider(model=model, price=2_500_000, name="rtx-4090", gpu="NVIDIA RTX 4090")
    offline = make_provider(model=model, price=1, name="gone")
    providers_mark_stale(now=datetime.now(UTC) + timedelta(hours=1))  # both go offline
    provider_heartbeat(provider=provider, state="online")  # one comes back
    offline.refresh_from_db()
    assert offline.state == "offline"
    provider_measurement_record(provider=provider, throughput=12_345.0, latency_ms=18.0, success_rate=0.98)

    listing = Client().get(reverse("web:providers")).content.decode()
    assert "rtx-4090" in listing and "2.500000" in listing and "12,345 tokens/s/block" in listing
    assert "10.000000" in listing  # per million tokens through its 4 blocks: 2.5 x 4
    # Online providers come first even when an offline one is cheaper.
    assert listing.index("rtx-4090") < listing.index("gone")

    page = Client().get(reverse("web:provider", args=[provider.pk]))
    assert page.status_code == 200
    body = page.content.decode()
    assert provider.peer_id in body and "NVIDIA RTX 4090" in body
    assert "98.0%" in body  # probe success rate
    assert "18 ms/token" in body and "10.000000 credits per million tokens" in body
    # Registered moments ago: its uptime is over its own life, and says so, never "over the last 24 h".
    assert re.search(r'id="uptime">\d+\.\d% over the last \d+ (s|min) \(since it registered\)', body)
    # The owner's username is not published.
    assert provider.user.username not in body


def test_providers_are_paginated(monkeypatch: pytest.MonkeyPatch) -> None:
    from marketplace.web import views

    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    model = make_model()
    for price, name in ((3, "prov-c"), (1, "prov-a"), (2, "prov-b")):
        make_provider(model=model, price=price, name=name)
    first = Client().get(reverse("web:providers")).content.decode()
    assert "prov-a" in first and "prov-b" in first and "prov-c" not in first and "page 1 of 2" in first
    second = Client().get(reverse("web:providers"), {"page": "2"}).content.decode()
    assert "prov-c" in second and "prov-b" not in second
    assert "prov-c" in Client().get(reverse("web:providers"), {"page": "99"}).content.decode()  # the last page


def test_provider_page_404s_for_unknown_ids() -> None:
    assert Client().get(reverse("web:provider", args=[999_999])).status_code == 404


def test_providers_filter_by_model() -> None:
    a, b = make_model(), make_model()
    make_provider(model=a, name="serves-a")
    make_provider(model=b, name="serves-b")
    body = Client().get(reverse("web:providers"), {"model": a.model_id}).content.decode()
    assert "serves-a" in body and "serves-b" not in body


def _flags(argv: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for flag, value in zip(argv[2::2], argv[3::2], strict=True):
        flags.setdefault(flag, []).append(value)
    return flags


def test_sell_page_command_is_complete_for_this_market(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_SWARM_PEERS = ["/ip4/10.0.0.1/tcp/31337/p2p/QmBootstrap", "/dns4/b.example/tcp/31337/p2p/QmB"]
    settings.HIVEMART_HEARTBEAT_PERIOD_S = 7
    settings.ALLOWED_HOSTS = ["market.example"]
    model = make_model(num_blocks=6)
    body = Client().get(reverse("web:sell"), HTTP_HOST="market.example").content.decode()
    argv = sell_argv(body)
    assert argv[:2] == [".venv/bin/hivemart-provider", "run"]
    flags = _flags(argv)
    assert flags["--market"] == ["http://market.example"]
    assert flags["--initial-peers"] == settings.HIVEMART_SWARM_PEERS  # the real bootstrap addresses
    assert flags["--num-blocks"] == ["6"]  # no more blocks than the model has
    assert flags["--heartbeat-period"] == ["7"]  # what this market's timeout is set for
    assert flags["--host-maddrs"] == ["/ip4/0.0.0.0/tcp/31338"]
    assert flags["--announce-maddrs"] == ["/ip4/$PUBLIC_IP/tcp/31338"]
    env = sell_env(body)
    assert env["HIVEMART_MODEL"] == f"/path/to/{model.model_id}" and env["HIVEMART_API_KEY"].startswith("hm_")
    assert "PUBLIC_IP" in env and "HIVEMART_INITIAL_PEERS" not in env


def test_sell_page_command_for_a_swarm_on_loopback_listens_there() -> None:
    from django.test import override_settings

    make_model(num_blocks=32)
    with override_settings(HIVEMART_SWARM_PEERS=["/ip4/127.0.0.1/tcp/4001/p2p/QmLocal"]):
        body = Client().get(reverse("web:sell")).content.decode()
    flags = _flags(sell_argv(body))
    assert flags["--num-blocks"] == ["8"]
    assert flags["--host-maddrs"] == ["/ip4/127.0.0.1/tcp/0"] and "--announce-maddrs" not in flags
    assert "PUBLIC_IP" not in sell_env(body)


def test_sell_page_without_a_published_swarm_says_to_ask_the_operator(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_SWARM_PEERS = []
    body = Client().get(reverse("web:sell")).content.decode()
    assert "--initial-peers" not in sell_argv(body)
    assert "HIVEMART_INITIAL_PEERS" in sell_env(body) and "ask its operator" in body


# --- sign-up, login, logout -----------------------------------------------------------------


def test_signup_creates_a_user_logs_in_and_lands_on_keys() -> None:
    client = Client()
    response = client.post(
        reverse("web:signup"),
        {"username": "newbie", "email": "n@example.org", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 302 and response["Location"] == reverse("web:keys")
    assert client.get(reverse("web:wallet")).status_code == 200  # logged in
    assert client.session.get("_auth_user_id")


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"username": "bob", "password1": PASSWORD, "password2": PASSWORD + "x"}, "password2", "differ"),
        ({"username": "bob", "password1": "123", "password2": "123"}, "password1", "too short"),
        ({"username": "bad name!", "password1": PASSWORD, "password2": PASSWORD}, "username", "letters, digits"),
        ({"username": "bob", "email": "not-an-email", "password1": PASSWORD, "password2": PASSWORD}, "email", "valid"),
    ],
)
def test_signup_rejects_bad_input_and_creates_nobody(data: dict, field: str, message: str) -> None:
    response = Client().post(reverse("web:signup"), data)
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert field in errors and any(message in e for e in errors[field])
    assert not ApiKey.objects.exists()
    from marketplace.accounts.models import User

    assert not User.objects.filter(username=data["username"]).exists()


def test_signup_refuses_a_taken_username() -> None:
    web_user("taken")
    response = Client().post(reverse("web:signup"), {"username": "taken", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 200
    assert "is taken" in response.context["form"].errors["username"][0]


def test_signup_closed_is_403(settings) -> None:  # noqa: ANN001
    settings.HIVEMART_OPEN_SIGNUP = False
    client = Client()
    assert client.get(reverse("web:signup")).status_code == 403
    assert (
        client.post(
            reverse("web:signup"), {"username": "x" * 5, "password1": PASSWORD, "password2": PASSWORD}
        ).status_code
        == 403
    )


def test_login_then_logout() -> None:
    web_user("carol")
    client = Client()
    bad = client.post(reverse("web:login"), {"username": "carol", "password": "wrong"})
    assert bad.status_code == 200 and "_auth_user_id" not in client.session
    good = client.post(reverse("web:login"), {"username": "carol", "password": PASSWORD})
    assert good.status_code == 302 and good["Location"] == reverse("web:wallet")
    assert client.get(reverse("web:jobs")).status_code == 200
    # Logging out is a POST (a GET link could be triggered by any page).
    assert client.get(reverse("web:logout")).status_code == 405
    out = client.post(reverse("web:logout"))
    assert out.status_code == 302
    assert client.get(reverse("web:jobs")).status_code == 302


# --- pages for signed-in clients --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/wallet/", "/jobs/", "/jobs/1/", "/keys/"])
def test_client_pages_redirect_anonymous_visitors_to_login(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('web:login')}?next={path}"


def test_revoke_needs_login_and_post() -> None:
    user = web_user()
    key = api_key_create(user=user).key
    assert Client().post(reverse("web:key-revoke", args=[key.pk])).status_code == 302
    assert logged_in(user).get(reverse("web:key-revoke", args=[key.pk])).status_code == 405
    key.refresh_from_db()
    assert key.is_active


def test_wallet_shows_balance_and_only_own_postings() -> None:
    alice, bob = web_user("alice"), web_user("bob")
    credit_grant(account=wallet_get_or_create(user=alice), amount=2_500_000, memo="alice's top-up")
    credit_grant(account=wallet_get_or_create(user=bob), amount=7_000_000, memo="bob's top-up")
    body = logged_in(alice).get(reverse("web:wallet")).content.decode()
    assert 'data-micro="2500000"' in body and "2.50" in body
    assert "alice&#x27;s top-up" in body
    assert "bob&#x27;s top-up" not in body and "7.00" not in body


def test_jobs_list_and_page_show_only_own_jobs_with_plan_and_cost() -> None:
    alice, bob = web_user("alice"), web_user("bob")
    funded(alice)
    funded(bob)
    job, provider = settled_job(alice, charge=300_000)
    bobs_job, _ = settled_job(bob)

    alice_client = logged_in(alice)
    listing = alice_client.get(reverse("web:jobs")).content.decode()
    assert f'href="/jobs/{job.pk}/"' in listing and f'href="/jobs/{bobs_job.pk}/"' not in listing

    detail = alice_client.get(reverse("web:job", args=[job.pk]))
    assert detail.status_code == 200
    body = detail.content.decode()
    assert 'id="job-state">done<' in body
    assert 'data-micro="300000"' in body  # spent
    assert "gpu-box" in body  # the plan's provider and the charge's payee
    fee = 300_000 * 500 // 10_000
    assert f"{(300_000 - fee) / 1e6:.3f}".rstrip("0") in body  # the provider's share, 0.285
    assert "0.70" in body  # released to the wallet: 1.00 budget - 0.30 spent
    # Another user's job is a 404, not a 403: its existence is not revealed.
    assert alice_client.get(reverse("web:job", args=[bobs_job.pk])).status_code == 404


def test_staff_may_open_any_job_but_list_only_their_own() -> None:
    alice, admin = web_user("alice"), web_user("admin", staff=True)
    funded(alice)
    job, _ = settled_job(alice)
    staff_client = logged_in(admin)
    assert staff_client.get(reverse("web:job", args=[job.pk])).status_code == 200
    assert f'href="/jobs/{job.pk}/"' not in staff_client.get(reverse("web:jobs")).content.decode()


def test_create_key_shows_it_once_and_it_authenticates() -> None:
    user = web_user()
    client = logged_in(user)
    response = client.post(reverse("web:keys"), {"name": "laptop"})
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0") or "no-cache" in response["Cache-Control"]
    raw = re.search(r'<code id="new-key">(hm_[0-9a-f]{12}_[A-Za-z0-9_-]{43})</code>', response.content.decode())
    assert raw, "the new key is on the page"
    assert api_key_authenticate(raw=raw.group(1)).user == user
    # Shown once: the list page has the prefix, never the key.
    again = client.get(reverse("web:keys")).content.decode()
    assert raw.group(1) not in again and "laptop" in again and raw.group(1)[3:15] in again


def test_create_key_validates_the_name() -> None:
    client = logged_in(web_user())
    response = client.post(reverse("web:keys"), {"name": "x" * 101})
    assert response.status_code == 200 and "name" in response.context["form"].errors
    assert not ApiKey.objects.exists()


def test_revoke_own_key_but_not_someone_elses() -> None:
    alice, bob = web_user("alice"), web_user("bob")
    own = api_key_create(user=alice, name="mine")
    other = api_key_create(user=bob, name="bobs")
    client = logged_in(alice)
    assert "bobs" not in client.get(reverse("web:keys")).content.decode()

    assert client.post(reverse("web:key-revoke", args=[other.key.pk])).status_code == 404
    assert api_key_authenticate(raw=other.raw).user == bob

    response = client.post(reverse("web:key-revoke", args=[own.key.pk]))
    assert response.status_code == 302
    with pytest.raises(AuthenticationFailed, match="revoked"):
        api_key_authenticate(raw=own.raw)


def test_staff_cannot_revoke_other_peoples_keys_from_the_web() -> None:
    admin, bob = web_user("admin", staff=True), web_user("bob")
    other = api_key_create(user=bob)
    assert logged_in(admin).post(reverse("web:key-revoke", args=[other.key.pk])).status_code == 404
    assert api_key_authenticate(raw=other.raw).user == bob


def test_forms_need_the_csrf_token() -> None:
    user = web_user()
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(reverse("web:keys"), {"name": "x"}).status_code == 403
    assert not ApiKey.objects.exists()


# --- health -----------------------------------------------------------------------------------


def test_healthz_reports_database_and_broker() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]


def test_healthz_is_503_when_the_broker_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler.celery import app

    # A port nothing listens on (1 is reserved and closed on loopback).
    monkeypatch.setattr(app.conf, "broker_url", "redis://127.0.0.1:1/0")
    response = Client().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True


# --- settlement: receipts, settlements, reputation, audits -----------------------------------


def settings_fee_bps() -> int:
    from django.conf import settings

    return settings.HIVEMART_PLATFORM_FEE_BPS


@pytest.fixture
def platform_key(settings, tmp_path):  # noqa: ANN001,ANN201
    from tests.marketplace.settlement import platform_key_file

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)


def test_job_page_shows_receipts_and_settlements(platform_key) -> None:  # noqa: ANN001
    from marketplace.receipts.services import receipts_settle, receipts_upload
    from tests.marketplace.settlement import planned_job

    pj = planned_job(budget=1_000_000, price=1_000)
    provider = pj.providers[0]
    receipt = pj.receipt(provider, 40_000)
    outcomes = receipts_upload(user=pj.client, receipts=[receipt.to_dict()])
    assert [o.status for o in outcomes] == ["accepted"]
    summary = receipts_settle(job_ids=[pj.job.pk], close=False)
    assert summary.captured > 0

    body = logged_in(pj.client).get(reverse("web:job", args=[pj.job.pk])).content.decode()
    receipts = body.split('id="receipts"', 1)[1].split("</table>", 1)[0]
    assert "40000" in receipts and "primary" in receipts and ">yes<" in receipts  # countersigned by the client
    settlements = body.split('id="settlements"', 1)[1].split("</table>", 1)[0]
    assert f'href="/providers/{provider.pk}/"' in settlements and "40000" in settlements
    assert f'data-micro="{summary.captured}"' in body  # the cost matches what settlement captured
    # The provider's operator does not see the client's job page, but sees the earnings in their wallet.
    operator = provider.user
    operator_client = logged_in(operator)
    assert operator_client.get(reverse("web:job", args=[pj.job.pk])).status_code == 404
    earned = summary.captured - summary.captured * settings_fee_bps() // 10_000
    earnings = operator_client.get(reverse("web:wallet")).content.decode().split('id="earnings"', 1)[1]
    assert f'data-micro="{earned}"' in earnings.split("</table>", 1)[0]
    assert 'id="earnings"' not in logged_in(pj.client).get(reverse("web:wallet")).content.decode()


def test_provider_pages_show_reputation() -> None:
    provider = make_provider(name="trusted")
    listing = Client().get(reverse("web:providers")).content.decode()
    assert "Reputation" in listing and '<td class="num">100</td>' in listing
    page = Client().get(reverse("web:provider", args=[provider.pk])).content.decode()
    assert 'id="reputation">100 / 100<' in page and 'id="offences"' in page


def make_audit():  # noqa: ANN201
    """An audit filed by a job's owner and decided against the provider, through the real services."""
    from marketplace.receipts.services import audit_create, audit_verdict_record
    from tests.marketplace.settlement import planned_job

    pj = planned_job()
    ticket = pj.ticket(pj.providers[0])
    audit = audit_create(
        user=pj.client,
        job=pj.job,
        ticket_id=ticket.ticket_id,
        session_id="session-0001",
        start=0,
        end=4,
        dtype="float32",
        inputs=b"in",
        claimed=b"claimed",
        reference=b"reference",
        reference_peer=pj.backups[0].peer_id,
        deposit=100_000,
    )
    return audit_verdict_record(audit_id=audit.pk, verdict="provider_cheated", detail="outputs differ by 3.2")


def test_audits_page_is_for_staff_only(platform_key) -> None:  # noqa: ANN001
    audit = make_audit()
    assert Client().get(reverse("web:audits"))["Location"].startswith(reverse("web:login"))
    client_user = audit.job.user
    assert logged_in(client_user).get(reverse("web:audits")).status_code == 403
    assert "Audits" not in logged_in(client_user).get(reverse("web:wallet")).content.decode().split("<main>")[0]

    staff = logged_in(web_user("auditor", staff=True))
    response = staff.get(reverse("web:audits"))
    assert response.status_code == 200
    body = response.content.decode()
    assert f"#{audit.pk}" in body and "provider cheated" in body.lower().replace("_", " ")
    assert "outputs differ by 3.2" in body and f'href="/jobs/{audit.job_id}/"' in body
    assert 'href="/staff/audits/"' in body  # staff see the menu entry


def test_provider_page_shows_lowered_reputation_and_the_offence(platform_key, settings) -> None:  # noqa: ANN001
    audit = make_audit()
    page = Client().get(reverse("web:provider", args=[audit.provider_id])).content.decode()
    reputation = 100 - settings.HIVEMART_REPUTATION_PENALTY
    assert f'id="reputation">{reputation} / 100<' in page
    offences = page.split('id="offences"', 1)[1].split("</table>", 1)[0]
    assert "failed an audit" in offences and f"audit #{audit.pk}" in offences


def test_signup_shares_the_apis_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    from marketplace.web import views

    cache.clear()
    monkeypatch.setattr(views._SignupThrottle, "THROTTLE_RATES", {"signup": "2/hour"})
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"signup": "2/hour"})
    client = Client()
    bad = {"username": "x", "password1": "a", "password2": "b"}  # invalid attempts count too
    assert client.post(reverse("web:signup"), bad).status_code == 200
    # One sign-up through the API from the same address uses up the shared budget.
    api = client.post(
        "/api/auth/signup/", {"username": "via-api", "password": PASSWORD}, content_type="application/json"
    )
    assert api.status_code == 201
    refused = client.post(reverse("web:signup"), {"username": "late", "password1": PASSWORD, "password2": PASSWORD})
    assert refused.status_code == 429 and b"Too many sign-ups" in refused.content
    from marketplace.accounts.models import User

    assert not User.objects.filter(username="late").exists()
    cache.clear()


def test_uptime_counts_the_state_from_before_the_window() -> None:
    from hivemart_core.protocol.identity import Identity
    from marketplace.providers.selectors import UPTIME_WINDOW
    from marketplace.web.selectors import provider_card_get
    from tests.marketplace.factories import make_user, register

    now = datetime.now(UTC)
    provider = register(
        user=make_user(), identity=Identity.generate(), model=make_model(), now=now - timedelta(days=10)
    )
    provider_heartbeat(provider=provider, state="online", now=now - timedelta(days=9))  # online before the window
    providers_mark_stale(now=now - UPTIME_WINDOW / 2)  # offline for the second half of it
    card = provider_card_get(provider_id=provider.pk, now=now)
    assert card.uptime.fraction == pytest.approx(0.5)
    assert str(card.uptime) == "50.0% over the last 24 h"


def test_overview_prices_a_million_tokens_through_the_whole_model() -> None:
    model = make_model(num_blocks=4)
    make_provider(model=model, start=0, end=2, price=1_000)
    make_provider(model=model, start=2, end=4, price=3_000)
    make_provider(model=model, start=0, end=4, price=2_000)
    body = Client().get(reverse("web:overview")).content.decode()
    # Each block where it is cheapest: blocks 0-1 at 1000, blocks 2-3 at 2000 per million units.
    assert "from 0.006000 credits per million tokens" in body
