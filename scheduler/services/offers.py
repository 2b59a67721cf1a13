"""Offers and requests in the matcher's terms, and the figures the scheduler trusts.

- Figures: a provider's latest *measured* throughput, latency and success rate when a probe
  has measured it, otherwise its self-reported throughput and latency (reliability then
  counts as exactly the floor: usable until the first probe says otherwise). A provider
  whose measured success rate is below ``HIVEMART_RELIABILITY_FLOOR_PCT`` is *degraded* and
  never planned.
- Units: a provider's throughput is work units per second, i.e. tokens/s through one block,
  which is what :class:`scheduler.matching.Offer` takes. A job's ``min_throughput`` is work
  units per second for the whole chain, so every segment must sustain
  ``min_throughput / num_blocks`` tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.conf import settings

from marketplace.catalog.models import CatalogModel
from marketplace.jobs.models import Job
from marketplace.jobs.services import SegmentSpec
from marketplace.providers.selectors import ProviderOffer, offers_for_model
from scheduler.matching import JobRequest, Offer, Segment

# Latency assumed for a provider that has reported none and was never probed: pessimistic,
# so measured providers win ties.
UNKNOWN_LATENCY_MS = 1000.0
# Throughput (tokens/s per block) stood in for a planned provider with no current figures
# (a matcher Segment must have a positive one).
UNKNOWN_THROUGHPUT = 1e-9
_REASON_LIMIT = 200


def reason_clip(text: str) -> str:
    """``text`` cut to fit a transition's ``reason`` column (what a client reads of it)."""
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


def reliability_floor() -> float:
    """The success rate below which a measured provider is degraded (a fraction)."""
    return settings.HIVEMART_RELIABILITY_FLOOR_PCT / 100


def matching_offer(offer: ProviderOffer) -> Offer | None:
    """``offer`` as the matcher sees it; None when it cannot be planned with (no throughput
    figure yet, or a probe measured nothing)."""
    if offer.throughput is None or offer.throughput <= 0:
        return None
    latency = UNKNOWN_LATENCY_MS if offer.latency_ms is None else offer.latency_ms
    reliability = reliability_floor() if offer.success_rate is None else offer.success_rate
    return Offer(
        provider_id=str(offer.provider_id),
        start=offer.block_start,
        end=offer.block_end,
        price=offer.price,
        throughput=offer.throughput,
        latency_ms=latency,
        reliability=reliability,
    )


def offers_for_matching(*, model: CatalogModel) -> list[Offer]:
    """Every online, unsuspended provider's offer for ``model`` that the matcher can use."""
    return [o for o in map(matching_offer, offers_for_model(model=model)) if o is not None]


def job_request(job: Job) -> JobRequest:
    """What ``job`` asks of the swarm, in the matcher's terms."""
    num_blocks = job.model.num_blocks
    min_throughput = job.min_throughput / num_blocks if job.min_throughput else None
    return JobRequest(
        num_blocks=num_blocks,
        kind=job.kind,
        max_price=job.max_price,
        budget=job.budget,
        min_throughput=min_throughput,
        backups=settings.HIVEMART_PLAN_BACKUPS,
        reliability_floor=reliability_floor(),
    )


def segment_specs(segments: Sequence[Segment]) -> list[SegmentSpec]:
    """The matcher's segments as the jobs app stores them (provider ids back to integers)."""
    return [
        SegmentSpec(
            block_start=s.start,
            block_end=s.end,
            provider=int(s.primary),
            backups=[int(b) for b in s.backups],
            price=s.price,
        )
        for s in segments
    ]
