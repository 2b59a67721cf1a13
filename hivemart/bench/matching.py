"""``hivemart bench matching``: how long :func:`scheduler.matching.match_job` takes on a
random swarm. Pure Python and NumPy, like the module it measures."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from scheduler.matching import KINDS, JobRequest, Offer, Plan, match_job

__all__ = ["random_swarm", "bench_job", "run_matching_bench"]

# The bench job's limits: about a quarter of the random offers fail the price cap and half
# the reliability floor, so filtering is part of what is measured.
_MAX_PRICE = 1500
_RELIABILITY_FLOOR = 0.75


def random_swarm(providers: int, blocks: int, *, seed: int = 0) -> list[Offer]:
    """``providers`` offers with random spans (1 to half the model long), prices,
    per-block throughputs, hop latencies and reliabilities.

    The first few offers tile the model at the price cap with full reliability, so that
    the bench job always has a plan, whatever the sizes; the rest are uniform at random."""
    if providers < 1 or blocks < 1:
        raise ValueError("a swarm needs at least one provider and one block")
    rng = random.Random(seed)
    longest = max(1, blocks // 2)
    offers: list[Offer] = []
    for start in range(0, blocks, longest):
        if len(offers) == providers:
            break
        offers.append(
            Offer(
                provider_id=f"anchor-{start}",
                start=start,
                end=min(blocks, start + longest),
                price=_MAX_PRICE,
                throughput=50.0,
                latency_ms=50.0,
                reliability=1.0,
            )
        )
    while len(offers) < providers:
        length = rng.randint(1, longest)
        start = rng.randint(0, blocks - length)
        offers.append(
            Offer(
                provider_id=f"provider-{len(offers)}",
                start=start,
                end=start + length,
                price=rng.randint(100, 2000),
                throughput=rng.uniform(5.0, 200.0),
                latency_ms=rng.uniform(5.0, 150.0),
                reliability=rng.uniform(0.5, 1.0),
            )
        )
    return offers


def bench_job(blocks: int, kind: str = "inference", backups: int = 2) -> JobRequest:
    """The job the bench matches: a price cap, a reliability floor, ``backups`` per segment."""
    return JobRequest(
        num_blocks=blocks,
        kind=kind,
        max_price=_MAX_PRICE,
        budget=10**12,
        backups=backups,  # type: ignore[arg-type]
        reliability_floor=_RELIABILITY_FLOOR,
    )


def run_matching_bench(
    *,
    providers: int = 10_000,
    blocks: int = 80,
    repeats: int = 20,
    seed: int = 0,
    kind: str = "inference",
    backups: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Match one job ``repeats`` times against one random swarm; the median wall time per
    match, in ms, is ``ms_per_match``. One untimed match runs first (warm caches)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    offers = random_swarm(providers, blocks, seed=seed)
    job = bench_job(blocks, kind, backups)
    plan: Plan = match_job(job, offers)
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        plan = match_job(job, offers)
        timings.append((time.perf_counter() - began) * 1000.0)
    if progress is not None:
        progress(
            f"{kind}: {len(plan.segments)} segments, {plan.latency_ms:.1f} ms/token, "
            f"{plan.cost_per_million_tokens} micro-credits per million tokens"
        )
    return {
        "providers": providers,
        "blocks": blocks,
        "ms_per_match": round(statistics.median(timings), 3),
        "kind": kind,
        "repeats": repeats,
        "seed": seed,
        "segments": len(plan.segments),
        "min_ms": round(min(timings), 3),
        "max_ms": round(max(timings), 3),
    }
