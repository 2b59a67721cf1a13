"""Reads for providers, including the offers the scheduler matches jobs against."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet

from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import NotFound
from marketplace.providers.models import Provider, ProviderMeasurement


def providers_visible_to(*, user: User) -> QuerySet[Provider]:
    """A user's own providers; staff see all of them."""
    providers = Provider.objects.select_related("model", "latest_measurement", "earnings_account")
    return providers if user.is_staff else providers.filter(user=user)


def provider_get(*, user: User, provider_id: int) -> Provider:
    try:
        return providers_visible_to(user=user).get(pk=provider_id)
    except Provider.DoesNotExist:
        raise NotFound(f"no provider {provider_id}") from None


def provider_measurements(*, provider: Provider) -> QuerySet[ProviderMeasurement]:
    return provider.measurements.all()


@dataclass(frozen=True)
class ProviderOffer:
    """One provider's offer as the scheduler sees it.

    ``throughput`` (work units per second), ``latency_ms`` and ``success_rate`` are the
    scheduler's latest measurement when one exists (``measured`` is True); otherwise the
    provider's self-reported figures, with ``success_rate`` None (nothing vouches for it).
    Either figure may be None when nobody has reported it yet.
    """

    provider_id: int
    peer_id: str
    model_id: str
    block_start: int
    block_end: int
    price: int  # micro-credits per million work units
    throughput: float | None
    latency_ms: float | None
    success_rate: float | None
    measured: bool
    measured_at: datetime | None
    region: str
    state: str
    last_heartbeat_at: datetime | None

    def covers(self, start: int, end: int) -> bool:
        """Whether this offer serves every block of ``[start, end)``."""
        return self.block_start <= start and end <= self.block_end


def _offer(provider: Provider) -> ProviderOffer:
    m = provider.latest_measurement
    return ProviderOffer(
        provider_id=provider.pk,
        peer_id=provider.peer_id,
        model_id=provider.model.model_id,
        block_start=provider.block_start,
        block_end=provider.block_end,
        price=provider.price,
        throughput=m.throughput if m else provider.reported_throughput,
        latency_ms=m.latency_ms if m else provider.reported_latency_ms,
        success_rate=m.success_rate if m else None,
        measured=m is not None,
        measured_at=m.measured_at if m else None,
        region=provider.region,
        state=provider.state,
        last_heartbeat_at=provider.last_heartbeat_at,
    )


def offers_for_model(*, model: CatalogModel, include_draining: bool = False) -> list[ProviderOffer]:
    """The offers of every online, unsuspended provider serving ``model``, by span then price.

    Draining providers finish their sessions but take no new work, so they are left out
    unless ``include_draining`` (useful to show, not to plan with).
    """
    states = [Provider.State.ONLINE] + ([Provider.State.DRAINING] if include_draining else [])
    providers = (
        Provider.objects.select_related("model", "latest_measurement")
        .filter(model=model, state__in=states, suspended_at__isnull=True)
        .order_by("block_start", "price", "pk")
    )
    return [_offer(p) for p in providers]


def provider_offer(*, provider: Provider) -> ProviderOffer:
    """One provider's offer, whatever its state (for display and for checking a plan)."""
    return _offer(provider)
