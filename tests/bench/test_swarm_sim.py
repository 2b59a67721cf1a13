"""The swarm simulation (hivemart/bench/swarm_sim.py): Petals' rule as written in Petals,
the trace's churn, the arms' bookkeeping, and the bench's shape. Small sizes, no timings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from hivemart.bench.swarm_sim import (
    CRASH,
    EXPIRE,
    JOIN,
    LEAVE,
    Provider,
    Trace,
    _Arm,
    make_trace,
    petals_choose_best_start,
    petals_should_choose_other_blocks,
    run_swarm_sim,
    simulate,
)
from hivemart.cli import cli
from hivemart_core.placement import block_throughputs, choose_span

SMALL = {"providers": 200, "blocks": 16, "hours": 2}


# --- Petals' rule, worked by hand ------------------------------------------------------------


@pytest.mark.parametrize(
    ("throughputs", "length", "start"),
    [
        ([5, 1, 3, 0, 4], 2, 2),  # windows sorted: [1,5] [1,3] [0,3] [0,4]: [0,3] is least
        ([0, 2, 0, 1], 2, 2),  # [0,2] [0,2] [0,1]: tied on the weakest, the second decides
        ([1, 1, 1], 2, 0),  # all equal: the lowest start
        ([3, 2, 1], 3, 0),  # one window
        ([4, 0, 4, 4, 0], 1, 1),  # a hole: the first hole
    ],
)
def test_petals_best_start_is_the_lexicographically_least_sorted_window(throughputs, length, start):
    assert petals_choose_best_start(np.array(throughputs, dtype=float), length) == start


def test_petals_best_start_agrees_with_the_literal_rule_on_random_swarms():
    rng = np.random.default_rng(4)
    for _ in range(200):
        t = rng.integers(0, 5, size=12).astype(float)
        length = int(rng.integers(1, 13))
        literal = min((sorted(t[i : i + length]), i) for i in range(len(t) - length + 1))[-1]
        assert petals_choose_best_start(t, length) == literal


def test_petals_moves_when_the_rebalanced_swarm_is_much_stronger():
    # T = [20, 20, 1, 1]. Server a moves to blocks 2:4; nobody else then moves; the weakest
    # block goes from 1 to 10, and 1/10 < 0.75.
    spans = {0: (0, 2, 10.0), 1: (0, 2, 10.0), 2: (2, 4, 1.0)}
    assert petals_should_choose_other_blocks(0, spans, 4, np.random.default_rng(0)) is True


def test_petals_never_moves_a_server_whose_leaving_would_empty_a_block():
    # T = [10, 10, 9, 9]: without a, blocks 0:2 have nobody.
    spans = {0: (0, 2, 10.0), 1: (2, 4, 9.0)}
    assert petals_should_choose_other_blocks(0, spans, 4, np.random.default_rng(0)) is False


def test_petals_stays_on_its_best_place():
    # T = [10, 5]: without a (5 on block 0) block 0 still has 5 >= block 1's 5; start 0 is best.
    spans = {0: (0, 1, 5.0), 1: (0, 1, 5.0), 2: (1, 2, 5.0)}
    assert petals_should_choose_other_blocks(0, spans, 2, np.random.default_rng(0)) is False


def test_petals_does_not_move_for_a_small_gain():
    # T = [14, 11]. b (2 on block 0) would rather serve block 1: after it moves the weakest
    # block is 12, and 11/12 is not below 0.75.
    spans = {0: (0, 1, 12.0), 1: (0, 1, 2.0), 2: (1, 2, 11.0)}
    assert petals_should_choose_other_blocks(1, spans, 2, np.random.default_rng(0)) is False
    # With balance_quality above 1 Petals always moves (its debugging switch).
    assert petals_should_choose_other_blocks(1, spans, 2, np.random.default_rng(0), balance_quality=1.5) is True


# --- the trace ----------------------------------------------------------------------------------


def test_trace_churn_is_heavy_tailed_and_deterministic():
    trace = make_trace(2000, 16, 12, seed=3)
    stats = trace.stats
    assert stats["sessions"] > 2000  # providers come back after going offline
    # Pareto lifetimes: the mean well above the median, the tail far above both.
    assert stats["session_mean_s"] > 1.5 * stats["session_median_s"]
    assert stats["session_p99_s"] > 10 * stats["session_median_s"]
    assert 1800 < stats["session_median_s"] < 3600
    kinds = [e[2] for e in trace.events]
    ends = kinds.count(LEAVE) + kinds.count(CRASH)
    assert 0.2 < kinds.count(CRASH) / ends < 0.4
    assert kinds.count(JOIN) == stats["sessions"]
    assert make_trace(2000, 16, 12, seed=3).events == trace.events
    assert make_trace(2000, 16, 12, seed=4).events != trace.events
    # The GPU mix holds every kind, and no provider holds more blocks than the model has.
    assert {p.gpu for p in trace.providers} == set(range(5))
    assert all(1 <= p.hold <= 16 for p in trace.providers)


@pytest.mark.parametrize("bad", [{"providers": 0}, {"blocks": 0}, {"hours": 0}])
def test_trace_refuses_empty_sizes(bad):
    with pytest.raises(ValueError):
        make_trace(**{**SMALL, **bad})


def test_simulate_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="hivemart or petals"):
        simulate(make_trace(**SMALL), "random")


# --- the arms -------------------------------------------------------------------------------------


def _tiny_trace() -> Trace:
    providers = [Provider(gpu=0, throughput=float(10 + i), hold=2, price=100 + i, latency_ms=20.0) for i in range(6)]
    return Trace(blocks=4, hours=1, providers=providers, events=[])


def test_hivemart_arm_places_by_the_real_rule_from_every_span():
    arm = _Arm(_tiny_trace(), "hivemart", 0)
    for pid in range(6):
        expected = choose_span(4, 2, [(s, e, arm.trace.providers[q].throughput) for q, (s, e) in arm.span.items()])
        arm.join(pid, 0.0)
        assert arm.span[pid] == expected
    spans = [(s, e, arm.trace.providers[q].throughput) for q, (s, e) in arm.span.items()]
    assert arm.true == arm.view == block_throughputs(4, spans)


def test_a_crashed_primary_fails_over_to_a_live_provider_and_its_record_lingers():
    arm = _Arm(_tiny_trace(), "hivemart", 0)
    for pid in range(6):
        arm.join(pid, 0.0)
    arm.start_job(1, 100, 0.0)
    victim = int(sorted(arm.jobs[1].plan.primaries)[0])
    arm.depart(victim, 1.0, crashed=True)
    assert arm.failovers == 1
    assert all(int(p) in arm.alive for p in arm.jobs[1].plan.primaries)
    # Placement still sees the crashed provider until its record expires; the swarm does not.
    assert arm.view != arm.true
    arm.expire(victim)
    assert arm.view == arm.true
    arm.finish(1)
    assert arm.served == 1 and not arm.jobs


def test_a_moving_provider_serves_nothing_until_it_has_reloaded():
    arm = _Arm(_tiny_trace(), "hivemart", 0)
    arm.join(0, 0.0)
    arm.join(1, 0.0)  # takes blocks 2:4
    arm.span[1] = (0, 2)  # pretend it had joined on 0's blocks, leaving 2:4 empty
    arm.true = arm.view = [0.0] * 4
    for pid in (0, 1):
        arm._add(arm.true, pid, arm.span[pid])
    arm.view = list(arm.true)
    arm.check(1, 0.0)
    assert arm.moves == 1 and 1 in arm.reloading and arm.true[2:] == [0.0, 0.0]
    arm.moved(1)
    assert arm.span[1] == (2, 4) and arm.true == [10.0, 10.0, 11.0, 11.0]


# --- the bench ------------------------------------------------------------------------------------


def test_bench_shape_and_determinism():
    a = run_swarm_sim(**SMALL, seed=5)
    b = run_swarm_sim(**SMALL, seed=5)
    a.pop("run_seconds"), b.pop("run_seconds")
    assert a == b
    for key in ("weakest_throughput", "petals_weakest_throughput"):
        assert len(a[key]) == 2 and all(v >= 0 for v in a[key])
    assert a["weakest_throughput"][1] > 0  # 200 providers cover 16 blocks after the first hour
    assert a["jobs_served"] > 0 and a["petals_jobs_served"] > 0
    assert a["moves"] >= 0 and a["petals_moves"] >= 0


def test_bench_cli_prints_the_json_line():
    result = CliRunner().invoke(
        cli, ["bench", "swarm-sim", "--json", "--providers", "200", "--blocks", "16", "--hours", "2", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    expected = {"providers", "blocks", "hours", "weakest_throughput", "petals_weakest_throughput", "moves"}
    assert expected | {"petals_moves", "jobs_served", "petals_jobs_served"} <= set(line)
    assert (line["providers"], line["blocks"], line["hours"]) == (200, 16, 2)


def test_the_mean_bound_never_changes_petals_answer():
    rng = np.random.default_rng(7)
    answers = []
    for trial in range(150):
        blocks = int(rng.integers(2, 9))
        spans = {}
        for server in range(int(rng.integers(2, 9))):
            length = int(rng.integers(1, blocks + 1))
            start = int(rng.integers(0, blocks - length + 1))
            spans[server] = (start, start + length, float(rng.integers(1, 20)))
        me = int(rng.integers(0, len(spans)))
        fast = petals_should_choose_other_blocks(me, spans, blocks, np.random.default_rng(trial))
        full = petals_should_choose_other_blocks(me, spans, blocks, np.random.default_rng(trial), use_bound=False)
        assert fast == full
        answers.append(full)
    assert True in answers and False in answers  # both answers were exercised


@pytest.mark.parametrize(("rule", "ttl"), [("hivemart", 90.0), ("petals", 240.0)])
def test_a_crashed_provider_looks_online_until_its_rule_would_notice(rule, ttl):
    # Petals' DHT records outlive a crash by two update periods; the marketplace notices
    # missed heartbeats (60 s) at its next sweep (30 s).
    arm = _Arm(_tiny_trace(), rule, 0)
    arm.join(0, 0.0)
    arm.depart(0, 100.0, crashed=True)
    assert arm.true == [0.0] * 4 and arm.view != arm.true
    assert [(when, kind, who) for when, _, kind, who in arm.heap] == [(100.0 + ttl, EXPIRE, 0)]
