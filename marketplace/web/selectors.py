"""Reads composed for the web pages.

The pages show what the other apps already know; these functions only gather it (through
those apps' selectors where one exists) into the shapes the templates draw. Nothing here
writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Case, OuterRef, QuerySet, Subquery, Value, When
from django.utils import timezone

from hivemart_core.placement import block_throughputs
from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.selectors import api_keys_visible_to
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_models
from marketplace.common.errors import NotFound
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import jobs_visible_to
from marketplace.ledger.models import Hold, Posting, Transaction
from marketplace.ledger.selectors import hold_captured, hold_left
from marketplace.providers.models import Provider, ProviderEvent, ProviderMeasurement
from marketplace.providers.selectors import ProviderOffer, offers_for_model, provider_offer, providers_visible_to
from marketplace.receipts.models import Audit, Offence, Receipt, Settlement
from marketplace.receipts.selectors import (
    audits_visible_to,
    provider_offences,
    receipts_visible_to,
    settlements_visible_to,
)

# Uptime is the share of this window (or of the time since registration, if shorter) spent online.
UPTIME_WINDOW = timedelta(days=7)


# --- overview -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCoverage:
    """How well the swarm serves one catalogued model right now."""

    model: CatalogModel
    offers: list[ProviderOffer]
    block_throughputs: list[float]  # work units/s per block, summed over online providers
    block_providers: list[int]  # online providers serving each block
    unmeasured: int  # offers whose throughput nobody reported yet (counted as 0)

    @property
    def holes(self) -> list[int]:
        """Blocks no online provider serves: a job on this model cannot be planned."""
        return [i for i, n in enumerate(self.block_providers) if n == 0]

    @property
    def weakest(self) -> float:
        """The throughput of the weakest block (what bounds a chain through every block)."""
        return min(self.block_throughputs)


def _coverage(model: CatalogModel) -> ModelCoverage:
    offers = offers_for_model(model=model)
    spans = [(o.block_start, o.block_end, o.throughput or 0.0) for o in offers]
    counts = [0] * model.num_blocks
    for offer in offers:
        for block in range(offer.block_start, min(offer.block_end, model.num_blocks)):
            counts[block] += 1
    return ModelCoverage(
        model=model,
        offers=offers,
        block_throughputs=block_throughputs(model.num_blocks, spans),
        block_providers=counts,
        unmeasured=sum(1 for o in offers if o.throughput is None),
    )


def catalog_coverage() -> list[ModelCoverage]:
    """Every active catalogued model with its per-block coverage by online, unsuspended providers."""
    return [_coverage(model) for model in catalog_models()]


# --- providers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderCard:
    """What anyone may see of a provider: its offer, figures and record (never its owner)."""

    provider: Provider
    offer: ProviderOffer
    uptime: float | None  # fraction of UPTIME_WINDOW online; None before any state is known


def online_fraction(
    transitions: Sequence[tuple[datetime, str]], *, initial_state: str | None, start: datetime, end: datetime
) -> float | None:
    """The share of ``[start, end)`` spent in the ``online`` state.

    ``transitions`` are ``(at, to_state)`` in time order, all within the interval;
    ``initial_state`` is the state at ``start`` (None: the provider did not exist yet, which
    counts as not observed, so the interval effectively starts at the first transition).
    None when nothing at all was observed.
    """
    state, since = initial_state, start
    observed = online = timedelta(0)
    for at, to_state in transitions:
        if state is not None:
            observed += at - since
            online += at - since if state == Provider.State.ONLINE else timedelta(0)
        state, since = to_state, at
    if state is not None:
        observed += end - since
        online += end - since if state == Provider.State.ONLINE else timedelta(0)
    if observed <= timedelta(0):
        return None
    return online / observed


def _uptimes(providers: Iterable[Provider], *, now: datetime) -> dict[int, float | None]:
    """Uptime over the window for each provider, from its state-changing events (two queries)."""
    ids = [p.pk for p in providers]
    start = now - UPTIME_WINDOW
    events = (
        ProviderEvent.objects.filter(provider_id__in=ids, at__gte=start, at__lte=now)
        .exclude(to_state="")
        .order_by("at", "id")
        .values_list("provider_id", "at", "to_state")
    )
    per_provider: dict[int, list[tuple[datetime, str]]] = {pk: [] for pk in ids}
    for pk, at, to_state in events:
        per_provider[pk].append((at, to_state))
    # The state each provider was in when the window opened: its last state change before then
    # (one correlated subquery, so old history is never loaded).
    before = (
        ProviderEvent.objects.filter(provider_id=OuterRef("pk"), at__lt=start)
        .exclude(to_state="")
        .order_by("-at", "-id")
        .values("to_state")[:1]
    )
    initial = dict(
        Provider.objects.filter(pk__in=ids).annotate(state_then=Subquery(before)).values_list("pk", "state_then")
    )
    return {pk: online_fraction(per_provider[pk], initial_state=initial.get(pk), start=start, end=now) for pk in ids}


def _public_providers() -> QuerySet[Provider]:
    return Provider.objects.select_related("model", "latest_measurement")


def providers_listed(*, model_id: str | None = None, online_only: bool = False) -> QuerySet[Provider]:
    """Every provider, online ones first (they are the ones a job can be planned on), then by
    price; optionally of one model, or online and unsuspended only."""
    providers = _public_providers()
    if model_id:
        providers = providers.filter(model__model_id=model_id)
    if online_only:
        providers = providers.filter(state=Provider.State.ONLINE, suspended_at__isnull=True)
    online_first = Case(When(state=Provider.State.ONLINE, then=Value(0)), default=Value(1))
    return providers.order_by(online_first, "price", "pk")


def provider_cards(providers: Iterable[Provider], *, now: datetime | None = None) -> list[ProviderCard]:
    """Public cards (offer, figures, uptime) for ``providers``, e.g. one page of :func:`providers_listed`."""
    rows = list(providers)
    uptimes = _uptimes(rows, now=now or timezone.now())
    return [ProviderCard(provider=p, offer=provider_offer(provider=p), uptime=uptimes[p.pk]) for p in rows]


def provider_card_get(*, provider_id: int, now: datetime | None = None) -> ProviderCard:
    """One provider's public card; NotFound when there is no such provider."""
    provider = _public_providers().filter(pk=provider_id).first()
    if provider is None:
        raise NotFound(f"no provider {provider_id}")
    uptime = _uptimes([provider], now=now or timezone.now())[provider.pk]
    return ProviderCard(provider=provider, offer=provider_offer(provider=provider), uptime=uptime)


def provider_recent_events(*, provider: Provider, limit: int = 20) -> list[ProviderEvent]:
    return list(provider.events.all()[:limit])


def provider_recent_measurements(*, provider: Provider, limit: int = 10) -> list[ProviderMeasurement]:
    return list(provider.measurements.all()[:limit])


def provider_recent_offences(*, provider: Provider, limit: int = 20) -> list[Offence]:
    """Failed audits and wrong probe answers: what lowered the provider's reputation."""
    return list(provider_offences(provider_id=provider.pk)[:limit])


# --- the signed-in client -----------------------------------------------------------------


def own_jobs(*, user: User) -> QuerySet[Job]:
    """The user's own jobs, newest first (staff too see only theirs here)."""
    return jobs_visible_to(user=user).filter(user=user)


def own_api_keys(*, user: User) -> QuerySet[ApiKey]:
    return api_keys_visible_to(user=user).filter(user=user)


def wallet_postings(*, user: User) -> QuerySet[Posting]:
    """Postings on the user's own wallet, newest first."""
    return (
        Posting.objects.select_related("transaction")
        .filter(account__user=user, account__kind="wallet")
        .order_by("-transaction__created_at", "-id")
    )


def own_providers(*, user: User) -> QuerySet[Provider]:
    """The user's own providers with their earnings accounts (what selling has paid so far)."""
    return providers_visible_to(user=user).filter(user=user).order_by("id")


def open_holds(*, user: User) -> list[tuple[Hold, int]]:
    """The user's open holds (credits set aside for running jobs) with what is left of each."""
    holds = Hold.objects.select_related("escrow").filter(payer__user=user, state=Hold.State.OPEN).order_by("-id")
    return [(hold, hold.escrow.balance) for hold in holds]


@dataclass(frozen=True)
class Charge:
    """One payment out of a job's hold: to whom, and how much of it was the platform's fee."""

    transaction: Transaction
    amount: int  # micro-credits taken from the hold
    provider_share: int
    fee: int
    provider: Provider | None


@dataclass(frozen=True)
class JobCost:
    budget: int
    captured: int  # paid to providers and fees so far
    left: int  # still held
    released: int  # returned to the wallet
    charges: list[Charge]


def job_cost(*, job: Job) -> JobCost | None:
    """What a job has cost so far, charge by charge (None for a job without a hold)."""
    hold = job.hold
    if hold is None:
        return None
    transactions = Transaction.objects.filter(hold=hold).prefetch_related("postings__account").order_by("created_at")
    charges, released = [], 0
    for tx in transactions:
        postings = list(tx.postings.all())
        if tx.kind == Transaction.Kind.CAPTURE:
            amount = -sum(p.amount for p in postings if p.account_id == hold.escrow_id)
            fee = sum(p.amount for p in postings if p.account.kind == "fees")
            payee = next((p.account for p in postings if p.account.kind == "earnings"), None)
            provider = Provider.objects.filter(earnings_account=payee).first() if payee else None
            charges.append(
                Charge(transaction=tx, amount=amount, provider_share=amount - fee, fee=fee, provider=provider)
            )
        elif tx.kind == Transaction.Kind.RELEASE:
            released += sum(p.amount for p in postings if p.account_id == hold.payer_id)
    return JobCost(
        budget=hold.amount,
        captured=hold_captured(hold=hold),
        left=hold_left(hold=hold),
        released=released,
        charges=charges,
    )


# --- settlement -----------------------------------------------------------------------------


def job_receipts(*, user: User, job: Job) -> QuerySet[Receipt]:
    """The job's work receipts (one per ticket and session, the latest cumulative one)."""
    return (
        receipts_visible_to(user=user).filter(ticket__job=job).order_by("ticket__segment", "ticket__role", "session_id")
    )


def job_settlements(*, user: User, job: Job) -> QuerySet[Settlement]:
    return settlements_visible_to(user=user).filter(job=job).order_by("created_at", "id")


def audits_for_staff(*, user: User) -> QuerySet[Audit]:
    """Every audit, newest first (the caller checks that ``user`` is staff)."""
    return audits_visible_to(user=user).select_related("job").order_by("-created_at", "-id")
