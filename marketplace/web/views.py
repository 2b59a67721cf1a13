"""The web pages. Thin: parse the request, call a selector or a service, render a template.

Pages anyone may see: overview, providers, sell compute, sign-up, login. Pages for a
signed-in client: wallet, jobs, API keys (only their own). Writes go through the owning
app's services (``user_create``, ``api_key_create``, ``api_key_revoke``).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from rest_framework.throttling import SimpleRateThrottle

from hivemart_core.figures import price_per_million_tokens
from marketplace.accounts.selectors import api_key_get
from marketplace.accounts.services import api_key_create, api_key_revoke, user_create
from marketplace.common.errors import ApplicationError, NotFound
from marketplace.jobs.selectors import job_failure_reason, job_get, job_plan_current, job_transitions
from marketplace.ledger.selectors import wallet_balance
from marketplace.payments import services as payments
from marketplace.payments.selectors import (
    own_topups,
    payout_requests_visible_to,
    payout_requests_waiting,
    topup_get,
    topup_offer,
)
from marketplace.payments.services import payout_approve, payout_mark_paid, payout_reject
from marketplace.web import selectors
from marketplace.web.charts import coverage_chart
from marketplace.web.forms import ApiKeyCreateForm, PayoutDecisionForm, PayoutRequestForm, SignupForm, TopUpForm
from marketplace.web.health import health_checks
from marketplace.web.sell import sell_command

PAGE_SIZE = 50
# A job page reloads itself this often until the job ends, so its owner can watch it (no JavaScript).
JOB_REFRESH_S = 5
# Fields user_create names in its errors, and the sign-up form's field each belongs to.
_SIGNUP_FIELDS = {"username": "username", "password": "password1"}


class _SignupThrottle(SimpleRateThrottle):
    """Sign-ups per client address, sharing the API's ``signup`` rate and counter (HIVEMART_SIGNUP_RATE)."""

    scope = "signup"

    def get_cache_key(self, request: HttpRequest, view: object) -> str:
        # The same key as the API's ScopedRateThrottle, so the web form is no way around its limit.
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class LoginView(auth_views.LoginView):
    """Django's login page behind the shared lockout (``marketplace.accounts.lockout``): a locked
    (username, address) gets 429 and is told how long to wait, whatever password it sends."""

    template_name = "web/login.html"
    redirect_authenticated_user = True

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        if not getattr(self.request, "login_locked", False):
            return super().form_invalid(form)
        minutes = -(-settings.HIVEMART_LOGIN_LOCKOUT_S // 60)
        return self.render_to_response(self.get_context_data(form=form, locked_minutes=minutes), status=429)


def _page(request: HttpRequest, items: object) -> object:
    """The ``?page=`` page of ``items`` (out-of-range and malformed numbers give the nearest page)."""
    return Paginator(items, PAGE_SIZE).get_page(request.GET.get("page"))


def _market_url(request: HttpRequest) -> str:
    """The address agents and SDK clients should use: this site's own, as the browser reached it."""
    return request.build_absolute_uri("/").rstrip("/")


@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    coverage = [(c, coverage_chart(c.block_throughputs, c.block_providers)) for c in selectors.catalog_coverage()]
    online = selectors.providers_listed(online_only=True)
    return render(
        request,
        "web/overview.html",
        {"coverage": coverage, "online": selectors.provider_cards(online[:PAGE_SIZE]), "online_count": online.count()},
    )


@require_GET
def providers(request: HttpRequest) -> HttpResponse:
    model_id = request.GET.get("model", "").strip()[:128] or None
    page = _page(request, selectors.providers_listed(model_id=model_id))
    return render(
        request,
        "web/providers.html",
        {"page": page, "cards": selectors.provider_cards(page.object_list), "model_id": model_id},
    )


@require_GET
def provider_detail(request: HttpRequest, provider_id: int) -> HttpResponse:
    try:
        card = selectors.provider_card_get(provider_id=provider_id)
    except NotFound:
        raise Http404("no such provider") from None
    return render(
        request,
        "web/provider_detail.html",
        {
            "card": card,
            "events": selectors.provider_recent_events(provider=card.provider),
            "measurements": selectors.provider_recent_measurements(provider=card.provider),
            "offences": selectors.provider_recent_offences(provider=card.provider),
        },
    )


@require_GET
def sell(request: HttpRequest) -> HttpResponse:
    models = [c.model for c in selectors.catalog_coverage()]
    first = models[0] if models else None
    command = sell_command(
        market_url=_market_url(request),
        model_id=first.model_id if first else None,
        num_blocks=first.num_blocks if first else None,
        swarm_peers=settings.HIVEMART_SWARM_PEERS,
        heartbeat_period=settings.HIVEMART_HEARTBEAT_PERIOD_S,
    )
    return render(
        request,
        "web/sell.html",
        {
            "models": models,
            "command": command,
            "heartbeat_period": settings.HIVEMART_HEARTBEAT_PERIOD_S,
            "heartbeat_timeout": settings.HIVEMART_HEARTBEAT_TIMEOUT_S,
        },
    )


@never_cache
@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if not settings.HIVEMART_OPEN_SIGNUP:
        return render(request, "web/signup_closed.html", status=403)
    if request.user.is_authenticated:
        return redirect("web:wallet")
    if request.method == "POST" and not _SignupThrottle().allow_request(request, None):
        return render(request, "web/signup.html", {"form": SignupForm(), "throttled": True}, status=429)
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = user_create(
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password1"],
                email=form.cleaned_data["email"],
            )
        except ApplicationError as e:
            # The service's rules (name alphabet, password validators, a taken name) land on the field they name.
            field = _SIGNUP_FIELDS.get(e.extra.get("field"))
            for reason in e.extra.get("reasons", [e.message]):
                form.add_error(field, reason)
        else:
            login(request, user, backend="marketplace.accounts.lockout.LockoutModelBackend")
            messages.success(request, f"Welcome, {user.username}. Create an API key to use the SDK or sell compute.")
            return redirect("web:keys")
    return render(request, "web/signup.html", {"form": form})


@login_required
@require_GET
def wallet(request: HttpRequest) -> HttpResponse:
    user = request.user
    return render(
        request,
        "web/wallet.html",
        {
            "balance": wallet_balance(user=user),
            "holds": selectors.open_holds(user=user),
            "providers": selectors.own_providers(user=user),
            "page": _page(request, selectors.wallet_postings(user=user)),
            "topups": own_topups(user=user),
            "topup": topup_offer(),
            "payouts": payout_requests_visible_to(user=user).filter(user=user)[:PAGE_SIZE],
            "payable": selectors.own_providers(user=user).filter(earnings_account__balance__gt=0),
        },
    )


@login_required
@require_POST
def topup(request: HttpRequest) -> HttpResponse:
    """Start buying credits: off to the payment provider's checkout page (Stripe's, or the test
    provider's page on this site)."""
    form = TopUpForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Top-up: give a whole number of credits.")
        return redirect("web:wallet")
    wallet_url = request.build_absolute_uri(reverse("web:wallet"))
    try:
        created = payments.topup_create(
            user=request.user,
            credits=form.cleaned_data["credits"],
            success_url=f"{wallet_url}?topup=done",
            cancel_url=f"{wallet_url}?topup=cancelled",
        )
    except ApplicationError as e:
        messages.error(request, f"Top-up: {e.message}")
        return redirect("web:wallet")
    return redirect(created.checkout_url)


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def topup_test_pay(request: HttpRequest, topup_id: int) -> HttpResponse:
    """The test payment provider's checkout page: one button pays (no money moves)."""
    try:
        found = topup_get(user=request.user, topup_id=topup_id)
        if found.user_id != request.user.pk or found.provider != "test":
            raise NotFound(f"no test top-up {topup_id}")
        if request.method == "POST":
            paid = payments.topup_test_pay(user=request.user, topup_id=topup_id)
            messages.success(request, f"Test payment done: top-up #{paid.pk} added to your wallet.")
            return redirect("web:wallet")
    except NotFound:
        raise Http404("no such top-up") from None
    except ApplicationError as e:
        messages.error(request, f"Top-up: {e.message}")
        return redirect("web:wallet")
    return render(request, "web/topup_test_pay.html", {"topup": found})


@login_required
@require_POST
def payout_request(request: HttpRequest) -> HttpResponse:
    """Ask for a payout of one of your providers' earnings (held until staff decide)."""
    form = PayoutRequestForm(request.POST)
    if not form.is_valid():
        reasons = "; ".join(e for errors in form.errors.values() for e in errors)
        messages.error(request, f"Payout: {reasons}")
        return redirect("web:wallet")
    try:
        made = payments.payout_request_create(
            user=request.user, provider_id=form.cleaned_data["provider"], amount=form.cleaned_data["amount"]
        )
    except ApplicationError as e:
        messages.error(request, f"Payout: {e.message}")
        return redirect("web:wallet")
    messages.success(request, f"Payout request #{made.pk} sent: the amount is held until staff approve it.")
    return redirect(reverse("web:wallet") + "#payouts")


@login_required
@require_GET
def jobs(request: HttpRequest) -> HttpResponse:
    page = _page(request, selectors.own_jobs(user=request.user))
    return render(request, "web/jobs.html", {"page": page, "money_by_job": selectors.jobs_money(page.object_list)})


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        job = job_get(user=request.user, job_id=job_id)  # another user's job is a 404, not a 403: no probing
    except NotFound:
        raise Http404("no such job") from None
    plan = job_plan_current(job=job)
    return render(
        request,
        "web/job_detail.html",
        {
            "job": job,
            "failure_reason": job_failure_reason(job),
            "max_price_per_million_tokens": price_per_million_tokens(job.max_price, job.model.num_blocks),
            "plan": plan,
            "speed": selectors.plan_speed(plan=plan),
            "transitions": job_transitions(job=job),
            "cost": selectors.job_cost(job=job),
            "receipts": selectors.job_receipts(user=request.user, job=job),
            "settlements": selectors.job_settlements(user=request.user, job=job),
            "refresh_s": JOB_REFRESH_S,
        },
    )


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def keys(request: HttpRequest) -> HttpResponse:
    form = ApiKeyCreateForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            created = api_key_create(user=request.user, name=form.cleaned_data["name"])
        except ApplicationError as e:
            form.add_error("name", e.message)
        else:
            # Rendered in this response only (never stored, never redirected with), hence never_cache.
            form = ApiKeyCreateForm()
    return render(
        request,
        "web/keys.html",
        {
            "form": form,
            "created": created,
            "keys": selectors.own_api_keys(user=request.user),
            "market_url": _market_url(request),
        },
    )


@login_required
@require_POST
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    try:
        key = api_key_get(user=request.user, key_id=key_id)
        if key.user_id != request.user.pk:  # staff revoke other people's keys in the admin, not here
            raise NotFound(f"no API key {key_id}")
        api_key_revoke(key=key, by=request.user)
    except NotFound:
        raise Http404("no such key") from None
    messages.success(request, f"Key {key.prefix}… revoked; requests with it now fail.")
    return redirect(reverse("web:keys"))


@login_required
@require_GET
def audits(request: HttpRequest) -> HttpResponse:
    """Staff only: every audit with its verdict (a signed-in non-staff user gets 403)."""
    if not request.user.is_staff:
        raise PermissionDenied("staff only")
    return render(request, "web/audits.html", {"page": _page(request, selectors.audits_for_staff(user=request.user))})


@login_required
@require_GET
def staff_payouts(request: HttpRequest) -> HttpResponse:
    """Staff only: payout requests to decide (requested) or to pay (approved)."""
    if not request.user.is_staff:
        raise PermissionDenied("staff only")
    return render(request, "web/staff_payouts.html", {"waiting": payout_requests_waiting()[:PAGE_SIZE]})


_DECISIONS = {"approve": payout_approve, "reject": payout_reject}


@login_required
@require_POST
def staff_payout_decide(request: HttpRequest, request_id: int, action: str) -> HttpResponse:
    """Staff only: approve, reject or mark paid one payout request (the services check staff too)."""
    if not request.user.is_staff:
        raise PermissionDenied("staff only")
    note = PayoutDecisionForm(request.POST).data.get("note", "")[:200]
    try:
        if action == "paid":
            payout_mark_paid(request_id=request_id, by=request.user, reference=note)
        elif action in _DECISIONS:
            _DECISIONS[action](request_id=request_id, by=request.user, note=note)
        else:
            raise Http404("no such action")
    except ApplicationError as e:
        messages.error(request, f"Payout request #{request_id}: {e.message}")
    else:
        messages.success(request, f"Payout request #{request_id}: {action} done.")
    return redirect("web:staff-payouts")


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the broker answer, 503 (with what failed) otherwise."""
    checks = health_checks()
    ok = all(c.ok for c in checks)
    body = {
        "status": "ok" if ok else "unavailable",
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return JsonResponse(body, status=200 if ok else 503)
