"""scheduler.matching: plans checked against their definition and against brute force.

Property tests draw small swarms whose figures are exact in floating point (latencies in
whole ms, throughputs dividing 1000), so the matcher's objective must equal the best
over every chain, tie-breaks included, not merely come close.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from functools import cache

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemart.bench.matching import bench_job, random_swarm, run_matching_bench
from scheduler.matching import (
    Gap,
    InvalidJobError,
    InvalidOfferError,
    InvalidPlanError,
    JobRequest,
    NoPlanError,
    Offer,
    Plan,
    Segment,
    match_job,
    replan_segment,
)

# 1000 / t is a whole number for each of these, so per-block latencies are exact.
EXACT_THROUGHPUTS = [1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 20.0, 25.0, 40.0, 50.0, 100.0, 125.0, 250.0, 500.0, 1000.0]
PASSES = {"inference": 1, "finetune": 3}


def make_offer(provider_id: str = "p", start: int = 0, end: int = 4, **overrides: object) -> Offer:
    fields: dict[str, object] = {"price": 100, "throughput": 100.0, "latency_ms": 10.0, "reliability": 1.0}
    fields.update(overrides)
    return Offer(provider_id=provider_id, start=start, end=end, **fields)  # type: ignore[arg-type]


def make_job(num_blocks: int = 4, **overrides: object) -> JobRequest:
    fields: dict[str, object] = {"kind": "inference", "max_price": 1000, "budget": 10**9, "backups": 2}
    fields.update(overrides)
    return JobRequest(num_blocks=num_blocks, **fields)  # type: ignore[arg-type]


# --- the definition, written out independently of the matcher ------------------------------


def eligible(job: JobRequest, offer: Offer, start: int, end: int, exclude: Iterable[str] = ()) -> bool:
    """May ``offer`` serve blocks [start, end) of ``job``? (The module docstring's rules.)"""
    return (
        offer.start <= start
        and end <= offer.end
        and offer.price <= job.max_price
        and offer.reliability >= job.reliability_floor
        and offer.provider_id not in set(exclude)
        and (job.min_throughput is None or offer.throughput / (end - start) >= job.min_throughput)
    )


def segment_latency(offer: Offer, blocks: int) -> float:
    return offer.latency_ms + blocks * (1000.0 / offer.throughput)


def objective(kind: str, latency: float, cost: int) -> tuple[float, ...]:
    return (latency, cost) if kind == "inference" else (latency * cost, latency, cost)


def brute_force_points(
    job: JobRequest, offers: Sequence[Offer], start: int, end: int, exclude: Iterable[str] = ()
) -> set[tuple[float, int]]:
    """(latency, cost) of every chain over [start, end), by enumerating them all."""
    excluded = frozenset(exclude)

    @cache
    def chains_from(boundary: int) -> frozenset[tuple[float, int]]:
        if boundary == end:
            return frozenset({(0.0, 0)})
        points = set()
        for offer in offers:
            for stop in range(boundary + 1, end + 1):
                if eligible(job, offer, boundary, stop, excluded):
                    blocks = stop - boundary
                    here = (segment_latency(offer, blocks), offer.price * blocks * job.passes)
                    points |= {(here[0] + latency, here[1] + cost) for latency, cost in chains_from(stop)}
        return frozenset(points)

    return set(chains_from(start))


def brute_force_best(job: JobRequest, offers: Sequence[Offer]) -> tuple[float, ...] | None:
    points = brute_force_points(job, offers, 0, job.num_blocks)
    return min((objective(job.kind, latency, cost) for latency, cost in points), default=None)


def uncovered_blocks(job: JobRequest, offers: Sequence[Offer], exclude: Iterable[str] = ()) -> set[int]:
    return {b for b in range(job.num_blocks) if not any(eligible(job, o, b, b + 1, exclude) for o in offers)}


def offers_by_id(offers: Sequence[Offer]) -> dict[str, Offer]:
    return {offer.provider_id: offer for offer in offers}


def check_plan(
    job: JobRequest, offers: Sequence[Offer], plan: Plan, exclude: Iterable[str] = (), exact: bool = True
) -> None:
    """Every invariant a plan must satisfy, from its definition. With ``exact`` figures the
    backups must also be exactly the ranking the module promises."""
    by_id = offers_by_id(offers)

    def swapped_in(segment: Segment, provider_id: str) -> tuple[float, ...]:
        """The plan's objective with ``provider_id`` serving ``segment`` instead."""
        offer = by_id[provider_id]
        latency = plan.latency_ms - segment.latency_ms + segment_latency(offer, segment.blocks)
        cost = plan.cost_per_million_tokens + (offer.price - segment.price) * segment.blocks * job.passes
        return objective(job.kind, latency, cost)

    assert plan.kind == job.kind and plan.num_blocks == job.num_blocks
    covered = [block for segment in plan.segments for block in range(segment.start, segment.end)]
    assert covered == list(range(job.num_blocks)), "every block exactly once, in order"
    primaries = {segment.primary for segment in plan.segments}
    for segment in plan.segments:
        primary = by_id[segment.primary]
        assert eligible(job, primary, segment.start, segment.end, exclude)
        assert segment.price == primary.price <= job.max_price
        assert segment.latency_ms == segment_latency(primary, segment.blocks)
        assert segment.throughput == primary.throughput / segment.blocks
        assert len(segment.backups) <= job.backups
        assert segment.primary not in segment.backups
        assert len(set(segment.backups)) == len(segment.backups)
        for backup in segment.backups:
            assert eligible(job, by_id[backup], segment.start, segment.end, exclude), "a backup covers its segment"
        candidates = {
            o.provider_id
            for o in offers
            if o.provider_id != segment.primary and eligible(job, o, segment.start, segment.end, exclude)
        }
        assert len(segment.backups) == min(job.backups, len(candidates)), "up to K backups, as many as exist"
        # Providers that are no primary come first; the others only when those run out.
        in_use = [backup in primaries for backup in segment.backups]
        assert in_use == sorted(in_use)
        if any(in_use):
            assert candidates - primaries <= set(segment.backups)
        if exact:
            ranking = sorted(candidates, key=lambda c: (c in primaries, swapped_in(segment, c), c))
            assert segment.backups == tuple(ranking[: job.backups])
    assert (
        plan.cost_per_million_tokens == sum(by_id[s.primary].price * s.blocks for s in plan.segments) * PASSES[job.kind]
    )
    assert plan.latency_ms == pytest.approx(sum(s.latency_ms for s in plan.segments))
    if job.min_throughput is not None:
        assert plan.throughput >= job.min_throughput


# --- strategies ----------------------------------------------------------------------------


@st.composite
def swarms(
    draw: st.DrawFn, exact: bool = True, max_blocks: int = 6, max_offers: int = 6, kind: str | None = None
) -> tuple[JobRequest, list[Offer]]:
    """A job and its offers. Half the draws are permissive (every offer reliable and under
    the cap, more of them): those usually have plans, and fine-tuning trade-offs."""
    permissive = draw(st.booleans())
    num_blocks = draw(st.integers(2 if permissive else 1, max_blocks))
    count = draw(st.integers(3, max_offers + 2) if permissive else st.integers(1, max_offers))
    offers = []
    for index in range(count):
        start = draw(st.integers(0, num_blocks - 1))
        end = draw(st.integers(start + 1, num_blocks))
        if exact:
            throughput = draw(st.sampled_from(EXACT_THROUGHPUTS))
            latency = float(draw(st.integers(0, 40)))
        else:
            throughput = draw(st.floats(0.5, 2000.0))
            latency = draw(st.floats(0.0, 200.0))
        offers.append(
            Offer(
                provider_id=f"p{index}",
                start=start,
                end=end,
                price=draw(st.integers(1 if permissive else 0, 30)),
                throughput=throughput,
                latency_ms=latency,
                reliability=1.0 if permissive else draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
            )
        )
    job = JobRequest(
        num_blocks=num_blocks,
        kind=kind or draw(st.sampled_from(["inference", "finetune"])),  # type: ignore[arg-type]
        max_price=30 if permissive else draw(st.integers(0, 30)),
        budget=10**12,
        backups=draw(st.integers(0, 3)),
        reliability_floor=0.0 if permissive else draw(st.sampled_from([0.0, 0.5, 0.9])),
        min_throughput=draw(st.sampled_from([None, None, 1.0, 5.0, 20.0])),
    )
    return job, offers


property_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ----------------------------------------------------------------------------


@property_settings
@given(swarms())
def test_plan_is_valid_and_equals_the_brute_force_optimum(case: tuple[JobRequest, list[Offer]]) -> None:
    job, offers = case
    best = brute_force_best(job, offers)
    if best is None:
        with pytest.raises(NoPlanError) as caught:
            match_job(job, offers)
        named = {b for gap in caught.value.gaps for b in range(gap.start, gap.end)}
        assert named == uncovered_blocks(job, offers)
        return
    plan = match_job(job, offers)
    check_plan(job, offers, plan)
    assert plan.objective == best


@property_settings
@given(swarms(kind="finetune", max_blocks=5, max_offers=7))
def test_finetune_product_equals_the_brute_force_optimum(case: tuple[JobRequest, list[Offer]]) -> None:
    job, offers = case
    best = brute_force_best(job, offers)
    if best is not None:
        assert match_job(job, offers).objective == best


@property_settings
@given(swarms(exact=False))
def test_objective_matches_brute_force_with_arbitrary_figures(case: tuple[JobRequest, list[Offer]]) -> None:
    job, offers = case
    best = brute_force_best(job, offers)
    if best is None:
        with pytest.raises(NoPlanError):
            match_job(job, offers)
        return
    plan = match_job(job, offers)
    check_plan(job, offers, plan, exact=False)
    assert plan.objective[0] == pytest.approx(best[0], rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(swarms(max_blocks=10, max_offers=12), st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_the_order_of_offers(case: tuple[JobRequest, list[Offer]], rng: random.Random) -> None:
    job, offers = case
    shuffled = list(offers)
    rng.shuffle(shuffled)
    try:
        plan = match_job(job, offers)
    except NoPlanError as first:
        with pytest.raises(NoPlanError) as second:
            match_job(job, shuffled)
        assert str(second.value) == str(first)
        return
    assert match_job(job, shuffled) == plan


@property_settings
@given(swarms(), st.data())
def test_replacement_covers_the_failed_blocks_optimally_without_the_failed_provider(
    case: tuple[JobRequest, list[Offer]], data: st.DataObject
) -> None:
    job, offers = case
    try:
        plan = match_job(job, offers)
    except NoPlanError:
        return
    failed = data.draw(st.sampled_from(sorted(plan.primaries)))
    failed_blocks = [b for s in plan.segments if s.primary == failed for b in range(s.start, s.end)]
    try:
        replacement = replan_segment(plan, failed, offers, job)
    except NoPlanError as error:
        named = {b for gap in error.gaps for b in range(gap.start, gap.end)}
        assert named and named <= set(failed_blocks)
        assert named == uncovered_blocks(job, offers, exclude={failed}) & set(failed_blocks)
        return
    assert [b for s in replacement for b in range(s.start, s.end)] == failed_blocks
    by_id = offers_by_id(offers)
    for segment in replacement:
        assert failed != segment.primary and failed not in segment.backups
        assert eligible(job, by_id[segment.primary], segment.start, segment.end, {failed})
        for backup in segment.backups:
            assert eligible(job, by_id[backup], segment.start, segment.end, {failed})
    # A new plan with the replacements spliced in is valid, and for inference (additive)
    # each replaced run is as fast as any chain over it without the failed provider.
    spliced = sorted([s for s in plan.segments if s.primary != failed] + list(replacement), key=lambda s: s.start)
    Plan(kind=plan.kind, num_blocks=plan.num_blocks, segments=tuple(spliced))
    # A run of blocks is replaced by the best chain over it given the rest of the plan:
    # the fastest for inference, the lowest product with the rest's latency and cost added
    # for fine-tuning.
    run_start, run_end = failed_blocks[0], failed_blocks[-1] + 1
    if failed_blocks == list(range(run_start, run_end)):
        kept = [s for s in plan.segments if s.primary != failed]
        rest_latency = sum(s.latency_ms for s in kept)
        rest_cost = sum(s.price * s.blocks for s in kept) * job.passes
        points = brute_force_points(job, offers, run_start, run_end, exclude={failed})

        def key(point: tuple[float, int]) -> tuple[float, ...]:
            latency, cost = point
            return (
                objective(job.kind, latency, cost)
                if job.kind == "inference"
                else objective(job.kind, rest_latency + latency, rest_cost + cost)
            )

        found = (sum(s.latency_ms for s in replacement), sum(s.price * s.blocks for s in replacement) * job.passes)
        assert key(found) == min(map(key, points))


# --- objectives on constructed swarms ------------------------------------------------------


def test_inference_takes_the_lowest_latency_chain_even_through_more_hops() -> None:
    offers = [
        make_offer("whole", 0, 4, throughput=10.0, latency_ms=5.0),  # 5 + 400 ms
        make_offer("front", 0, 2, throughput=100.0, latency_ms=20.0),  # 20 + 20 ms
        make_offer("back", 2, 4, throughput=100.0, latency_ms=20.0),
    ]
    plan = match_job(make_job(4, backups=0), offers)
    assert [(s.start, s.end, s.primary) for s in plan.segments] == [(0, 2, "front"), (2, 4, "back")]
    assert plan.latency_ms == 80.0


def test_inference_latency_ties_go_to_the_cheaper_provider() -> None:
    offers = [
        make_offer("dear", 0, 4, price=300),
        make_offer("cheap", 0, 4, price=200),
        make_offer("dearest", 0, 4, price=900),
    ]
    plan = match_job(make_job(4), offers)
    assert plan.segments[0].primary == "cheap"
    assert plan.segments[0].backups == ("dear", "dearest")


def test_exact_ties_in_everything_go_to_the_smallest_provider_id() -> None:
    offers = [make_offer(name, 0, 4) for name in ("c", "a", "d", "b")]
    plan = match_job(make_job(4, backups=2), offers)
    assert plan.segments[0].primary == "a" and plan.segments[0].backups == ("b", "c")


def test_finetune_maximises_throughput_per_credit() -> None:
    # fast: 10 + 4 * 10 = 50 ms at 4 * 100 * 3 = 1200 -> 60,000; slow: 210 ms at 120 -> 25,200.
    offers = [
        make_offer("fast", 0, 4, throughput=100.0, latency_ms=10.0, price=100),
        make_offer("slow", 0, 4, throughput=20.0, latency_ms=10.0, price=10),
    ]
    finetune = match_job(make_job(4, kind="finetune"), offers)
    assert finetune.segments[0].primary == "slow"
    assert finetune.objective == (210.0 * 120, 210.0, 120)
    assert match_job(make_job(4, kind="inference"), offers).segments[0].primary == "fast"


def test_finetune_can_pick_neither_the_fastest_nor_the_cheapest() -> None:
    # (latency ms, cost per million tokens): fast (4, 1200), middle (40, 60), cheap (400, 12).
    offers = [
        make_offer("fast", 0, 4, throughput=1000.0, latency_ms=0.0, price=100),
        make_offer("middle", 0, 4, throughput=100.0, latency_ms=0.0, price=5),
        make_offer("cheap", 0, 4, throughput=10.0, latency_ms=0.0, price=1),
    ]
    plan = match_job(make_job(4, kind="finetune"), offers)
    assert plan.segments[0].primary == "middle"
    assert plan.objective == (40.0 * 60, 40.0, 60)
    assert plan.segments[0].backups == ("fast", "cheap")  # both at a product of 4800


def test_finetune_uses_a_free_provider_where_it_can() -> None:
    offers = [
        make_offer("a", 0, 4, throughput=100.0, latency_ms=0.0, price=1),
        make_offer("b", 0, 4, throughput=25.0, latency_ms=0.0, price=1),
        make_offer("c", 2, 4, throughput=100.0, latency_ms=0.0, price=0),
    ]
    plan = match_job(make_job(4, kind="finetune"), offers)
    assert plan.objective == brute_force_best(make_job(4, kind="finetune"), offers)
    assert [s.primary for s in plan.segments] == ["a", "c"]


def test_free_plans_are_ranked_by_latency() -> None:
    offers = [
        make_offer("free-slow", 0, 4, price=0, throughput=10.0),
        make_offer("free-fast", 0, 4, price=0),
        make_offer("paid", 0, 4, price=5, throughput=1000.0),
    ]
    plan = match_job(make_job(4, kind="finetune"), offers)
    assert plan.segments[0].primary == "free-fast" and plan.cost_per_million_tokens == 0
    assert plan.max_tokens(10) is None


def test_min_throughput_caps_how_many_blocks_a_provider_takes() -> None:
    # 100 tokens/s per block: at most 2 blocks keep a segment at >= 50 tokens/s.
    offers = [make_offer("x", 0, 4, throughput=100.0), make_offer("y", 2, 4, throughput=100.0, price=50)]
    assert [s.primary for s in match_job(make_job(4), offers).segments] == ["x"]
    plan = match_job(make_job(4, min_throughput=50.0), offers)
    assert [(s.start, s.end, s.primary) for s in plan.segments] == [(0, 2, "x"), (2, 4, "y")]
    assert plan.throughput == 50.0
    with pytest.raises(NoPlanError, match="slower than min_throughput"):
        match_job(make_job(4, min_throughput=101.0), offers)


def test_backups_rank_by_the_objective_and_avoid_primaries_when_the_swarm_allows() -> None:
    offers = [
        make_offer("left", 0, 4, throughput=100.0, latency_ms=10.0),  # 30 ms on 0..2, 50 on 0..4
        make_offer("right", 2, 4, throughput=1000.0, latency_ms=1.0),  # 3 ms on 2..4
        make_offer("wide", 0, 4, throughput=1000.0, latency_ms=100.0),  # 102 ms on two blocks
        make_offer("cover", 2, 4, throughput=10.0, latency_ms=0.0),
    ]  # 200 ms on 2..4
    plan = match_job(make_job(4, backups=3), offers)
    assert [(s.start, s.end, s.primary) for s in plan.segments] == [(0, 2, "left"), (2, 4, "right")]
    assert plan.segments[0].backups == ("wide",)
    # "left" is the fastest other provider on 2..4, but it is the primary of 0..2.
    assert plan.segments[1].backups == ("wide", "cover", "left")
    assert [s.backups for s in match_job(make_job(4, backups=1), offers).segments] == [("wide",), ("wide",)]


def test_price_cap_and_reliability_floor_exclude_offers() -> None:
    offers = [
        make_offer("fast-dear", 0, 4, throughput=1000.0, price=2000),
        make_offer("fast-flaky", 0, 4, throughput=1000.0, reliability=0.5),
        make_offer("ok", 0, 4, throughput=10.0, reliability=0.95),
    ]
    plan = match_job(make_job(4, max_price=1000, reliability_floor=0.9), offers)
    assert plan.segments[0].primary == "ok" and plan.segments[0].backups == ()


def test_exclude_keeps_a_provider_out_entirely() -> None:
    offers = [make_offer("a", 0, 4, throughput=1000.0), make_offer("b", 0, 4), make_offer("c", 0, 4)]
    plan = match_job(make_job(4), offers, exclude={"a"})
    assert plan.segments[0].primary == "b" and plan.segments[0].backups == ("c",)


# --- no plan -------------------------------------------------------------------------------


def test_error_names_the_price_that_would_be_needed() -> None:
    offers = [
        make_offer("a", 0, 12),
        make_offer("b", 16, 20),
        make_offer("dear", 12, 16, price=900),
        make_offer("dearer", 10, 20, price=1200),
    ]
    with pytest.raises(NoPlanError) as caught:
        match_job(make_job(20, max_price=500), offers)
    assert caught.value.gaps == (Gap(12, 16, "price", needed_price=900),)
    assert "blocks 12..16 are served only at >= 900 micro-credits per million units; raise max_price" in str(
        caught.value
    )
    assert caught.value.code == "no_plan" and caught.value.extra["gaps"][0]["needed_price"] == 900
    assert match_job(make_job(20, max_price=900), offers).segments[1].primary == "dear"


def test_error_names_every_uncovered_run_and_its_reason() -> None:
    offers = [
        make_offer("a", 0, 2),
        make_offer("flaky", 2, 4, reliability=0.3),
        make_offer("slow", 4, 5, throughput=1.0),
        make_offer("b", 5, 6),
        make_offer("bad", 7, 8, price=5000, reliability=0.1),
        make_offer("gone", 8, 9),
    ]
    with pytest.raises(NoPlanError) as caught:
        match_job(make_job(10, reliability_floor=0.9, min_throughput=5.0), offers, exclude={"gone"})
    assert [(g.start, g.end, g.reason) for g in caught.value.gaps] == [
        (2, 4, "reliability"),
        (4, 5, "throughput"),
        (6, 7, "no_offers"),
        (7, 8, "limits"),
        (8, 9, "excluded"),
        (9, 10, "no_offers"),
    ]
    message = str(caught.value)
    assert "blocks 2..4 are served only by providers below the reliability floor (best 0.3)" in message
    assert "blocks 4..5 are served only by providers slower than min_throughput (best 1 tokens/s per block)" in message
    assert "no provider offers blocks 6..7" in message and "no provider offers blocks 9..10" in message
    assert "blocks 8..9 are served only by excluded providers" in message


def test_no_offers_at_all() -> None:
    with pytest.raises(NoPlanError, match=r"no provider offers blocks 0\.\.3"):
        match_job(make_job(3), [])


def test_a_budget_that_pays_for_no_token_is_refused() -> None:
    # 4 blocks at 500_000 micro-credits per million units: 2 micro-credits a token.
    offers = [make_offer("a", 0, 4, price=500_000)]
    with pytest.raises(NoPlanError) as caught:
        match_job(make_job(4, max_price=10**6, budget=1), offers)
    assert caught.value.needed_budget == 2 and caught.value.gaps == ()
    plan = match_job(make_job(4, max_price=10**6, budget=2), offers)
    assert plan.max_tokens(2) == 1 and plan.cost_per_million_tokens == 2_000_000


# --- replanning ----------------------------------------------------------------------------


def test_replan_prefers_one_provider_holding_the_same_blocks() -> None:
    offers = [
        make_offer("a", 0, 2, throughput=1000.0),
        make_offer("b", 2, 4, throughput=1000.0),
        make_offer("b-twin", 2, 4, throughput=500.0),
        make_offer("pieces", 2, 3, throughput=1000.0),
        make_offer("pieces2", 3, 4, throughput=1000.0),
    ]
    job = make_job(4, backups=1)
    plan = match_job(job, offers)
    assert [s.primary for s in plan.segments] == ["a", "b"]
    replacement = replan_segment(plan, "b", offers, job)
    assert [(s.start, s.end, s.primary) for s in replacement] == [(2, 4, "b-twin")]
    assert "b" not in replacement[0].backups


def test_replan_chains_several_providers_when_none_holds_all_the_blocks() -> None:
    offers = [make_offer("whole", 0, 6), make_offer("x", 0, 3, latency_ms=50.0), make_offer("y", 3, 6, latency_ms=50.0)]
    job = make_job(6, backups=0)
    plan = match_job(job, offers)
    assert [s.primary for s in plan.segments] == ["whole"]
    replacement = replan_segment(plan, "whole", offers, job)
    assert [(s.start, s.end, s.primary) for s in replacement] == [(0, 3, "x"), (3, 6, "y")]


def test_replan_respects_the_price_cap_and_names_the_blocks_left_uncovered() -> None:
    offers = [make_offer("a", 0, 4), make_offer("dear", 0, 4, price=5000)]
    job = make_job(4, max_price=1000)
    plan = match_job(job, offers)
    with pytest.raises(NoPlanError) as caught:
        replan_segment(plan, "a", offers, job)
    assert caught.value.gaps == (Gap(0, 4, "price", needed_price=5000),)


def test_replan_refuses_a_provider_that_is_not_a_primary_and_a_plan_for_another_job() -> None:
    offers = [make_offer("a", 0, 4), make_offer("b", 0, 4, latency_ms=50.0)]
    job = make_job(4)
    plan = match_job(job, offers)
    with pytest.raises(InvalidPlanError, match="not a primary"):
        replan_segment(plan, "b", offers, job)
    with pytest.raises(InvalidPlanError, match="not for this job"):
        replan_segment(plan, "a", offers, make_job(4, kind="finetune"))


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"price": -1}, "price must be a non-negative integer"),
        ({"price": 1.5}, "price must be a non-negative integer"),
        ({"end": 0}, "is empty"),
        ({"start": -1}, "non-negative"),
        ({"reliability": 1.5}, r"reliability must be in \[0, 1\]"),
        ({"reliability": float("nan")}, r"reliability must be in \[0, 1\]"),
        ({"throughput": 0.0}, "throughput must be a positive number"),
        ({"throughput": float("inf")}, "throughput must be a positive number"),
        ({"latency_ms": -1.0}, "latency_ms must be a non-negative number"),
        ({"provider_id": ""}, "provider_id must be a non-empty string"),
        ({"start": True}, "span must be non-negative integers"),
    ],
)
def test_malformed_offers_are_refused(overrides: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "provider_id": "p",
        "start": 0,
        "end": 4,
        "price": 1,
        "throughput": 1.0,
        "latency_ms": 1.0,
        "reliability": 1.0,
    }
    fields.update(overrides)
    with pytest.raises(InvalidOfferError, match=message) as caught:
        Offer(**fields)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_blocks": 0}, "num_blocks must be an integer"),
        ({"kind": "training"}, "kind must be one of"),
        ({"max_price": -5}, "max_price must be an integer"),
        ({"budget": -1}, "budget must be a non-negative integer"),
        ({"budget": 1.0}, "budget must be a non-negative integer"),
        ({"min_throughput": 0.0}, "min_throughput must be a positive number"),
        ({"backups": -1}, "backups must be an integer"),
        ({"backups": False}, "backups must be an integer"),
        ({"reliability_floor": 1.01}, r"reliability_floor must be in \[0, 1\]"),
    ],
)
def test_malformed_jobs_are_refused(overrides: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"num_blocks": 4, "kind": "inference", "max_price": 1, "budget": 1}
    fields.update(overrides)
    with pytest.raises(InvalidJobError, match=message):
        JobRequest(**fields)  # type: ignore[arg-type]


def test_offers_beyond_the_model_or_twice_from_one_provider_are_refused() -> None:
    with pytest.raises(InvalidOfferError, match="spans blocks 2..9, beyond the model's 8 blocks"):
        match_job(make_job(8), [make_offer("a", 0, 8), make_offer("b", 2, 9)])
    with pytest.raises(InvalidOfferError, match="provider 'a' has more than one offer"):
        match_job(make_job(8), [make_offer("a", 0, 8), make_offer("a", 0, 4)])


def test_plans_round_trip_and_malformed_plans_are_refused() -> None:
    offers = [make_offer("a", 0, 2), make_offer("b", 2, 4), make_offer("c", 0, 4, latency_ms=30.0)]
    plan = match_job(make_job(4), offers)
    stored = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(stored) == plan
    assert stored["cost_per_million_tokens"] == plan.cost_per_million_tokens and stored["price"] == 100
    segment = Segment(start=0, end=2, primary="a", backups=(), price=1, latency_ms=1.0, throughput=1.0)
    with pytest.raises(InvalidPlanError, match="not at 4"):
        Plan(kind="inference", num_blocks=4, segments=(segment,))
    with pytest.raises(InvalidPlanError, match="in order"):
        Plan(kind="inference", num_blocks=4, segments=(segment, segment))
    with pytest.raises(InvalidPlanError, match="both primary and backup"):
        Segment(start=0, end=2, primary="a", backups=("a",), price=1, latency_ms=1.0, throughput=1.0)
    with pytest.raises(InvalidPlanError, match="malformed"):
        Plan.from_dict({"kind": "inference", "num_blocks": 4, "segments": [{"start": 0}]})


# --- the benchmark -------------------------------------------------------------------------


def test_bench_reports_the_median_and_its_swarm_has_a_plan() -> None:
    result = run_matching_bench(providers=300, blocks=12, repeats=2, seed=3)
    assert list(result)[:3] == ["providers", "blocks", "ms_per_match"]
    assert result["providers"] == 300 and result["blocks"] == 12 and result["ms_per_match"] > 0  # type: ignore[operator]
    offers = random_swarm(300, 12, seed=3)
    for kind in ("inference", "finetune"):
        job = bench_job(12, kind)
        plan = match_job(job, offers)
        check_plan(job, offers, plan, exact=False)


def test_bench_command_prints_json_last() -> None:
    from hivemart.cli import cli

    outcome = CliRunner().invoke(
        cli,
        ["bench", "matching", "--json", "--providers", "50", "--blocks", "6", "--repeats", "1", "--kind", "finetune"],
    )
    assert outcome.exit_code == 0, outcome.output
    last = json.loads(outcome.stdout.strip().splitlines()[-1])
    assert last["providers"] == 50 and last["blocks"] == 6 and last["kind"] == "finetune" and "ms_per_match" in last
