"""Reads for providers, including the offers the scheduler matches jobs against."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Case, OuterRef, QuerySet, Subquery, Value, When

from hivemart_core.figures import format_uptime
from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import NotFound
from marketplace.providers.models import Provider, ProviderEvent, ProviderMeasurement

# Uptime is the share of this window (or of the provider's observed life, if shorter) spent online.
UPTIME_WINDOW = timedelta(hours=24)


def providers_visible_to(*, user: User) -> QuerySet[Provider]:
    """A user's own providers; staff see all of them."""
    providers = Provider.objects.select_related("model", "latest_measurement", "earnings_account")
    return providers if user.is_staff else providers.filter(user=user)


def providers_public(*, model_id: str | None = None, online_only: bool = False) -> QuerySet[Provider]:
    """Every provider in the market (what anyone may see of them is the caller's to limit:
    the public serializer and pages show no owner, key or account), online ones first (they
    are the ones a job can be planned on), then by price; optionally of one model, or online
    and unsuspended only."""
    providers = Provider.objects.select_related("model", "latest_measurement")
    if model_id:
        providers = providers.filter(model__model_id=model_id)
    if online_only:
        providers = providers.filter(state=Provider.State.ONLINE, suspended_at__isnull=True)
    online_first = Case(When(state=Provider.State.ONLINE, then=Value(0)), default=Value(1))
    return providers.order_by(online_first, "price", "pk")


def provider_public_get(*, provider_id: int) -> Provider:
    """Any provider by id (for its public card); NotFound when there is none."""
    provider = Provider.objects.select_related("model", "latest_measurement").filter(pk=provider_id).first()
    if provider is None:
        raise NotFound(f"no provider {provider_id}")
    return provider


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


# --- uptime -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uptime:
    """The share of ``observed`` spent online. ``observed`` is ``window``, or less for a
    provider younger than it: a provider registered a minute ago has one minute of record,
    and says so, rather than "100% over 24 h"."""

    fraction: float | None  # None: no state recorded at all
    observed: timedelta
    window: timedelta

    def __str__(self) -> str:
        return format_uptime(self.fraction, self.observed.total_seconds(), self.window.total_seconds())


def online_time(
    transitions: Sequence[tuple[datetime, str]], *, initial_state: str | None, start: datetime, end: datetime
) -> tuple[timedelta, timedelta]:
    """``(online, observed)`` time within ``[start, end)``.

    ``transitions`` are ``(at, to_state)`` in time order, all within the interval;
    ``initial_state`` is the state at ``start`` (None: the provider did not exist yet, which
    counts as not observed, so the interval effectively starts at the first transition).
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
    return online, observed


def online_fraction(
    transitions: Sequence[tuple[datetime, str]], *, initial_state: str | None, start: datetime, end: datetime
) -> float | None:
    """The share of the observed part of ``[start, end)`` spent online (see :func:`online_time`);
    None when nothing at all was observed."""
    online, observed = online_time(transitions, initial_state=initial_state, start=start, end=end)
    return None if observed <= timedelta(0) else online / observed


def provider_uptimes(
    providers: Iterable[Provider], *, now: datetime, window: timedelta = UPTIME_WINDOW
) -> dict[int, Uptime]:
    """:class:`Uptime` over ``window`` for each provider, from its state-changing events (two queries)."""
    ids = [p.pk for p in providers]
    start = now - window
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
    uptimes = {}
    for pk in ids:
        online, observed = online_time(per_provider[pk], initial_state=initial.get(pk), start=start, end=now)
        fraction = None if observed <= timedelta(0) else online / observed
        uptimes[pk] = Uptime(fraction=fraction, observed=observed, window=window)
    return uptimes
