"""Probes: the platform measures online providers through the swarm (``scheduler.probing``),
checks their answers against its own reference computation, and records figures and offences."""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings

from marketplace.providers.models import Provider
from marketplace.providers.services import provider_measurement_record
from scheduler.services.offers import reliability_floor

logger = logging.getLogger(__name__)


def providers_to_probe() -> list[Provider]:
    """Online, unsuspended providers, with their models."""
    return list(
        Provider.objects.select_related("model")
        .filter(state=Provider.State.ONLINE, suspended_at__isnull=True)
        .order_by("pk")
    )


def provider_probe_record(
    *,
    provider: Provider,
    throughput: float,
    latency_ms: float,
    success_rate: float,
    samples: int,
    measured_at: datetime | None = None,
) -> bool:
    """Store a probe's figures; returns whether the provider is now degraded (its success
    rate is below the reliability floor, so matching leaves it out)."""
    provider_measurement_record(
        provider=provider,
        throughput=throughput,
        latency_ms=latency_ms,
        success_rate=success_rate,
        samples=samples,
        measured_at=measured_at,
    )
    degraded = success_rate < reliability_floor()
    if degraded:
        logger.warning("provider %s (%s) is degraded: success rate %.2f", provider.pk, provider.peer_id, success_rate)
    return degraded


def provider_is_degraded(provider: Provider) -> bool:
    """Whether the provider's latest measurement puts it below the reliability floor."""
    m = provider.latest_measurement
    return m is not None and m.success_rate < reliability_floor()


def _probe_offence(provider: Provider, result: object) -> None:
    from marketplace.receipts.models import Offence
    from marketplace.receipts.services.offences import provider_offence_record

    errors = "; ".join(result.errors)  # type: ignore[attr-defined]
    provider_offence_record(
        provider=provider,
        kind=Offence.Kind.PROBE,
        detail=f"{result.mismatches} probe answers differ from the validator's: {errors}",
    )  # type: ignore[attr-defined]


def providers_probe(*, runtime: object | None = None, references: object | None = None) -> dict[str, object]:
    """Probe every online provider through the swarm (``scheduler.probing``) and record the
    measured throughput, latency and success rate; those below the reliability floor are
    degraded. Joins the swarm through ``HIVEMART_SWARM_PEERS`` unless given a ``runtime``.

    Returns ``{"probed": [...], "degraded": [...], "skipped": [...]}`` (provider ids); a
    provider is skipped when the prober has no reference checkpoint for its model.
    """
    from marketplace.receipts.services.tickets import ticket_issue_for_probe
    from scheduler.probing import ProbeTarget, References, ReferenceUnavailable, probe_provider

    summary: dict[str, list[int]] = {"probed": [], "degraded": [], "skipped": []}
    providers = providers_to_probe()
    if not providers:
        return summary
    own_runtime = runtime is None
    if own_runtime:
        if not settings.HIVEMART_SWARM_PEERS:
            logger.warning(
                "not probing %d providers: set HIVEMART_SWARM_PEERS to the swarm's bootstrap multiaddrs", len(providers)
            )
            summary["skipped"] = [p.pk for p in providers]
            return summary
        from hivemart_core.swarm.runtime import SwarmRuntime

        runtime = SwarmRuntime(settings.HIVEMART_SWARM_PEERS)
    references = references or References(settings.HIVEMART_MODELS_DIR)
    try:
        for provider in providers:
            try:
                reference = references.get(provider.model.model_id)  # type: ignore[attr-defined]
            except ReferenceUnavailable as e:
                logger.warning("cannot check provider %s: %s", provider.pk, e)
                summary["skipped"].append(provider.pk)
                continue
            units = (1 + settings.HIVEMART_PROBE_REQUESTS * settings.HIVEMART_PROBE_TOKENS) * (
                provider.block_end - provider.block_start
            )
            ticket = ticket_issue_for_probe(provider=provider, max_units=units)
            result = probe_provider(
                runtime,
                ProbeTarget(
                    provider.peer_id,
                    provider.model.model_id,
                    provider.block_start,  # type: ignore[arg-type]
                    provider.block_end,
                    ticket=ticket,
                ),
                reference,
                tokens=settings.HIVEMART_PROBE_TOKENS,
                requests=settings.HIVEMART_PROBE_REQUESTS,
                timeout=settings.HIVEMART_PROBE_TIMEOUT_S,
            )
            summary["probed"].append(provider.pk)
            if result.mismatches:
                _probe_offence(provider, result)
            if provider_probe_record(
                provider=provider,
                throughput=result.throughput,
                latency_ms=result.latency_ms,
                success_rate=result.success_rate,
                samples=result.requests,
            ):
                summary["degraded"].append(provider.pk)
    finally:
        if own_runtime:
            runtime.shutdown()  # type: ignore[union-attr]
    return summary
