"""Reads composed for the web pages.

The pages show what the other apps already know; these functions only gather it (through
those apps' selectors where one exists) into the shapes the templates draw. Nothing here
writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet
from django.utils import timezone

from hivemart_core.figures import cheapest_price_per_million_tokens, price_per_million_tokens
from hivemart_core.placement import block_throughputs
from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.selectors import api_keys_visible_to
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_models
from marketplace.jobs.models import Job, Plan, PlanSegment
from marketplace.jobs.selectors import jobs_visible_to
from marketplace.ledger.models import Hold, Posting, Transaction
from marketplace.ledger.selectors import HoldMoney, hold_money
from marketplace.providers.models import Provider, ProviderEvent, ProviderMeasurement
from marketplace.providers.selectors import (
    ProviderOffer,
    Uptime,
    offers_for_model,
    provider_offer,
    provider_public_get,
    provider_uptimes,
    providers_public,
    providers_visible_to,
)
from marketplace.receipts.models import Audit, Offence, Receipt, Settlement
from marketplace.receipts.selectors import (
    audits_visible_to,
    provider_offences,
    receipts_visible_to,
    settlements_visible_to,
)

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
    def cheapest_per_million_tokens(self) -> int | None:
        """Micro-credits a million tokens cost through the whole model at the cheapest online offers."""
        return cheapest_price_per_million_tokens(
            self.model.num_blocks, [(o.block_start, o.block_end, o.price) for o in self.offers]
        )

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
    uptime: Uptime  # over providers.selectors.UPTIME_WINDOW, or the provider's life when shorter (stated)

    @property
    def blocks(self) -> int:
        return self.provider.block_end - self.provider.block_start

    @property
    def price_per_million_tokens(self) -> int:
        """Micro-credits a million tokens cost through this provider's whole span."""
        return price_per_million_tokens(self.provider.price, self.blocks)


def providers_listed(*, model_id: str | None = None, online_only: bool = False) -> QuerySet[Provider]:
    """Every provider, online ones first, then by price (:func:`providers_public`)."""
    return providers_public(model_id=model_id, online_only=online_only)


def provider_cards(providers: Iterable[Provider], *, now: datetime | None = None) -> list[ProviderCard]:
    """Public cards (offer, figures, uptime) for ``providers``, e.g. one page of :func:`providers_listed`."""
    rows = list(providers)
    uptimes = provider_uptimes(rows, now=now or timezone.now())
    return [ProviderCard(provider=p, offer=provider_offer(provider=p), uptime=uptimes[p.pk]) for p in rows]


def provider_card_get(*, provider_id: int, now: datetime | None = None) -> ProviderCard:
    """One provider's public card; NotFound when there is no such provider."""
    provider = provider_public_get(provider_id=provider_id)
    uptime = provider_uptimes([provider], now=now or timezone.now())[provider.pk]
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
    """A job's money: the totals are :func:`marketplace.ledger.selectors.hold_money`'s (the
    same computation the API and the CLI show), with the charges that make up ``spent``."""

    money: HoldMoney
    charges: list[Charge]

    @property
    def budget(self) -> int:
        return self.money.placed


def job_cost(*, job: Job) -> JobCost | None:
    """What a job has cost so far, charge by charge (None for a job without a hold)."""
    hold = job.hold
    if hold is None:
        return None
    transactions = (
        Transaction.objects.filter(hold=hold, kind=Transaction.Kind.CAPTURE)
        .prefetch_related("postings__account")
        .order_by("created_at")
    )
    charges = []
    for tx in transactions:
        postings = list(tx.postings.all())
        amount = -sum(p.amount for p in postings if p.account_id == hold.escrow_id)
        fee = sum(p.amount for p in postings if p.account.kind == "fees")
        payee = next((p.account for p in postings if p.account.kind == "earnings"), None)
        provider = Provider.objects.filter(earnings_account=payee).first() if payee else None
        charges.append(Charge(transaction=tx, amount=amount, provider_share=amount - fee, fee=fee, provider=provider))
    return JobCost(money=hold_money(holds=[hold])[hold.pk], charges=charges)


def jobs_money(jobs: Iterable[Job]) -> dict[int, HoldMoney]:
    """Held/spent/refunded of each job with a hold, by job id (one query for a page of jobs)."""
    rows = [job for job in jobs if job.hold is not None]
    money = hold_money(holds=[job.hold for job in rows])
    return {job.pk: money[job.hold_id] for job in rows}


@dataclass(frozen=True)
class SegmentSpeed:
    """One plan segment's per-token time from its provider's latest *probe* (never from
    self-reported figures or the matcher's stand-in for unmeasured providers)."""

    segment: PlanSegment
    latency_ms: float | None  # the probe's 1-token round trip through one block
    throughput: float | None  # the probe's tokens/s through one block
    measured_at: datetime | None

    @property
    def ms_per_token(self) -> float | None:
        """A hop plus one block (the probe's latency) plus the span's other blocks at the
        measured rate; None when the provider was never probed."""
        if self.latency_ms is None or not self.throughput:
            return None
        blocks = self.segment.block_end - self.segment.block_start
        return self.latency_ms + (blocks - 1) * 1000.0 / self.throughput


@dataclass(frozen=True)
class SpeedEstimate:
    segments: list[SegmentSpeed]

    @property
    def ms_per_token(self) -> float | None:
        """The chain's per-token latency, or None unless every segment was measured."""
        times = [s.ms_per_token for s in self.segments]
        return None if not times or None in times else sum(t for t in times if t is not None)

    @property
    def unmeasured(self) -> list[SegmentSpeed]:
        return [s for s in self.segments if s.ms_per_token is None]


def plan_speed(*, plan: Plan | None) -> SpeedEstimate | None:
    """The per-token latency a plan's chain should reach, from its providers' probes."""
    if plan is None:
        return None
    speeds = []
    for segment in plan.segments.all():
        m = ProviderMeasurement.objects.filter(provider_id=segment.provider_id).order_by("-measured_at", "-id").first()
        speeds.append(
            SegmentSpeed(
                segment=segment,
                latency_ms=m.latency_ms if m else None,
                throughput=m.throughput if m else None,
                measured_at=m.measured_at if m else None,
            )
        )
    return SpeedEstimate(segments=speeds)


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
