"""``hivemart bench swarm-sim``: Hivemart's placement, matching and failover rules against
Petals' placement rule on one simulated swarm with churn.

An event-driven simulation (a heap of timed events). One *trace* is drawn from the seed:
every provider's GPU (a consumer mix), WAN hop latency, its sessions online (Pareto
lifetimes: heavy-tailed, most short, a few very long), whether each session ends in a
graceful leave or a crash, the times providers check whether to move, and the jobs
(arrival times and lengths). Both arms replay the SAME trace; they differ only in the
placement rule deciding where a joining provider goes and whether a checking one moves:

- ``hivemart``: the real rule, :func:`hivemart_core.placement.choose_span` and
  :func:`~hivemart_core.placement.should_move` (what provider agents and the scheduler's
  ``placement_suggest`` call);
- ``petals``: Petals' ``choose_best_blocks`` and ``should_choose_other_blocks``
  (``src/petals/server/block_selection.py``), written out here: a checking server
  simulates its move and then every server re-choosing in random order until none moves,
  and moves if the weakest block gets faster than 1/0.75 times.

Jobs are matched in both arms by the real :func:`scheduler.matching.match_job` (price, and
measured throughput and latency, with ranked backups), and a primary that leaves, crashes
or moves mid-job is replaced by the real :func:`scheduler.matching.replan_segment` (one
failover). A crashed provider's record stays visible to placement and matching for
``RECORD_TTL_S`` (DHT records and heartbeats expire, they are not withdrawn: 240 s for
Petals' DHT records, 90 s for the marketplace's heartbeat timeout and sweep), so joins can
be placed by stale figures and jobs planned onto a dead provider, in both arms. A
moving provider serves nothing while it reloads weights (``_load_seconds``).

Reported per hour: the weakest block's throughput (sum of the per-block throughputs of the
providers serving the least-served block), as a time-weighted mean over the hour.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hivemart_core.placement import best_span, should_move
from scheduler.matching import JobRequest, NoPlanError, Offer, Plan, match_job, replan_segment

__all__ = [
    "GPU_MIX",
    "Trace",
    "make_trace",
    "petals_cannot_gain",
    "petals_choose_best_start",
    "petals_should_choose_other_blocks",
    "simulate",
    "run_swarm_sim",
]

# (name, share of providers, tokens/s through one block, blocks it holds of an 80-block
# model, price in micro-credits per million work units). Throughputs are whole numbers so
# per-block sums are exact in floating point: adding and removing a provider leaves no residue.
GPU_MIX: tuple[tuple[str, float, int, int, int], ...] = (
    ("RTX 3060 12GB", 0.30, 30, 8, 400),
    ("RTX 3080 10GB", 0.20, 50, 6, 500),
    ("RTX 3090 24GB", 0.25, 70, 16, 700),
    ("RTX 4090 24GB", 0.20, 110, 16, 1000),
    ("A100 80GB", 0.05, 160, 54, 1500),
)
_REFERENCE_BLOCKS = 80
# How long a crashed provider still looks online. Petals: its DHT records expire after about
# two 120 s update periods. Hivemart: joining agents ask the marketplace where to go and jobs
# are matched there, and it marks a provider offline once its heartbeats (every 15 s) have
# been silent for HIVEMART_HEARTBEAT_TIMEOUT_S (60 s), at the next housekeeping sweep
# (HIVEMART_HOUSEKEEPING_INTERVAL_S, 30 s): 90 s at worst, the figure used.
RECORD_TTL_S = {"hivemart": 90.0, "petals": 240.0}
PETALS_BALANCE_QUALITY = 0.75
_EPS = 1e-3  # Petals' eps in should_choose_other_blocks
# Sessions online: Pareto(alpha) * scale seconds (median scale * 2**(1/alpha), about 40 min;
# mean about 2.5 h). Offline gaps: lognormal, median 30 min.
_LIFETIME_ALPHA, _LIFETIME_SCALE_S = 1.2, 1500.0
_DOWNTIME_MEDIAN_S, _DOWNTIME_SIGMA = 1800.0, 1.0
_CRASH_SHARE = 0.3
_JOIN_WINDOW_S = 1800.0  # first joins spread over the first half hour
_HOP_MEDIAN_MS, _HOP_SIGMA = 40.0, 0.6

JOIN, LEAVE, CRASH, CHECK, JOB, EXPIRE, MOVED, DONE = range(8)


@dataclass(frozen=True, slots=True)
class Provider:
    gpu: int  # index into GPU_MIX
    throughput: float
    hold: int  # blocks it serves
    price: int
    latency_ms: float


@dataclass(slots=True)
class Trace:
    """What both arms replay: providers and timed events ``(time, seq, kind, subject)``;
    for JOB the subject is the job's token count."""

    blocks: int
    hours: int
    providers: list[Provider]
    events: list[tuple[float, int, int, int]]
    stats: dict[str, float] = field(default_factory=dict)


def _hold(blocks: int, reference: int) -> int:
    return max(1, min(blocks, round(reference * blocks / _REFERENCE_BLOCKS)))


def make_trace(
    providers: int, blocks: int, hours: int, *, seed: int = 0, checks_per_hour: int = 60, jobs_per_hour: int = 20
) -> Trace:
    """Draw the swarm's churn, the rebalancing checks and the jobs from ``seed``."""
    if providers < 1 or blocks < 1 or hours < 1:
        raise ValueError("providers, blocks and hours must be positive")
    rng = random.Random(seed)
    horizon = hours * 3600.0
    shares = [g[1] for g in GPU_MIX]
    people: list[Provider] = []
    events: list[tuple[float, int, int, int]] = []
    sessions: list[float] = []
    crashes = 0
    for pid in range(providers):
        gpu = rng.choices(range(len(GPU_MIX)), weights=shares)[0]
        _, _, tput, ref_hold, price = GPU_MIX[gpu]
        hop = min(400.0, max(5.0, rng.lognormvariate(math.log(_HOP_MEDIAN_MS), _HOP_SIGMA)))
        people.append(Provider(gpu, float(tput), _hold(blocks, ref_hold), price, round(hop, 1)))
        t = rng.uniform(0.0, _JOIN_WINDOW_S)
        while t < horizon:
            life = _LIFETIME_SCALE_S * rng.paretovariate(_LIFETIME_ALPHA)
            sessions.append(life)
            events.append((t, 0, JOIN, pid))
            end = t + life
            crashed = rng.random() < _CRASH_SHARE
            if end < horizon:
                crashes += crashed
                events.append((end, 0, CRASH if crashed else LEAVE, pid))
            t = end + rng.lognormvariate(math.log(_DOWNTIME_MEDIAN_S), _DOWNTIME_SIGMA)
    # Rebalancing checks: Petals servers check about every 2 minutes each; simulating that for
    # every one of 10,000 providers is out of reach (a Petals check may simulate every server
    # re-choosing), so a sample of providers check, the same ones at the same times in both
    # arms (a check of a provider offline or reloading then is skipped).
    for _ in range(checks_per_hour * hours):
        events.append((rng.uniform(0.0, horizon), 0, CHECK, rng.randrange(providers)))
    for _ in range(jobs_per_hour * hours):
        tokens = int(min(4096, max(16, rng.lognormvariate(math.log(256), 1.0))))
        events.append((rng.uniform(0.0, horizon), 0, JOB, tokens))
    events.sort()
    events = [(t, i, kind, subject) for i, (t, _, kind, subject) in enumerate(events)]
    ordered = sorted(sessions)
    stats = {
        "sessions": float(len(sessions)),
        "crashes": float(crashes),
        "session_median_s": ordered[len(ordered) // 2] if ordered else 0.0,
        "session_mean_s": sum(ordered) / len(ordered) if ordered else 0.0,
        "session_p99_s": ordered[int(len(ordered) * 0.99)] if ordered else 0.0,
    }
    return Trace(blocks, hours, people, events, stats)


# --- Petals' placement rule, as in src/petals/server/block_selection.py --------------------


def petals_choose_best_start(throughputs: np.ndarray, length: int) -> int:
    """``min((sorted(throughputs[i:i+length]), i) for i ...)[-1]``: the window whose sorted
    throughputs are lexicographically least; the lowest start wins a tie."""
    windows = sliding_window_view(throughputs, length)
    # The first key of the comparison is each window's minimum: sort only the windows tied on it.
    lows = windows.min(axis=1)
    tied = np.flatnonzero(lows == lows.min())
    if len(tied) == 1:
        return int(tied[0])
    ordered = np.sort(windows[tied], axis=1)
    # lexsort's last key is the primary one; it is stable, so equal windows keep index order.
    return int(tied[np.lexsort(ordered.T[::-1])[0]])


def petals_cannot_gain(
    weakest: float, total: float, num_blocks: int, balance_quality: float = PETALS_BALANCE_QUALITY
) -> bool:
    """Whether Petals' check must answer no, without simulating. Moves never change the sum
    over blocks, so no rebalancing lifts the weakest block above the mean: when even the
    mean is not ``1 / balance_quality`` times today's weakest, no server moves (what makes
    checks in a balanced swarm of 10,000 servers cheap)."""
    return weakest > total / num_blocks * (balance_quality - _EPS) * (1 + 1e-9)


def petals_should_choose_other_blocks(
    me: int,
    spans: dict[int, tuple[int, int, float]],
    num_blocks: int,
    rng: np.random.Generator,
    balance_quality: float = PETALS_BALANCE_QUALITY,
    *,
    use_bound: bool = True,
) -> bool:
    """Petals' ``should_choose_other_blocks`` for server ``me`` among ``spans`` (server ->
    ``(start, end, throughput)``, every server not offline): move if, after this server
    moves to its best start and then every server in random order re-chooses until none
    moves, the weakest block is faster than ``1 / balance_quality`` times today's."""
    if balance_quality > 1.0:
        return True
    throughputs = np.zeros(num_blocks)
    starts: dict[int, int] = {}
    # Sorted servers: the same sums for the same swarm, as Petals' compute_spans does.
    for server in sorted(spans):
        start, end, tput = spans[server]
        throughputs[start:end] += tput
        starts[server] = start
    initial = float(throughputs.min())
    if use_bound and petals_cannot_gain(initial, float(throughputs.sum()), num_blocks, balance_quality):
        return False
    start, end, tput = spans[me]
    length = end - start
    throughputs[start:end] -= tput * (1 + _EPS)
    if initial > _EPS and throughputs.min() <= 0:
        return False  # moving would leave a block unserved
    new_start = petals_choose_best_start(throughputs, length)
    if new_start == start:
        return False
    throughputs[start:end] += tput * _EPS
    starts[me] = new_start
    throughputs[new_start : new_start + length] += tput
    order = sorted(spans)
    moved = True
    while moved:
        rng.shuffle(order)
        moved = False
        for server in order:
            s = starts[server]
            _, e0, t = spans[server]
            n = e0 - spans[server][0]
            throughputs[s : s + n] -= t * (1 + _EPS)
            best = petals_choose_best_start(throughputs, n)
            throughputs[s : s + n] += t * _EPS
            if best != s:
                starts[server] = s = best
                moved = True
            throughputs[s : s + n] += t
    new = float(throughputs.min())
    if new < initial or new < _EPS:
        return False
    return initial / new < balance_quality - _EPS


# --- the simulation ----------------------------------------------------------------------------


def _load_seconds(hold: int) -> float:
    """Time a provider serves nothing while it loads a new span (disk cache, weights to GPU)."""
    return 20.0 + 2.0 * hold


@dataclass(slots=True)
class _Job:
    job: JobRequest
    plan: Plan
    done: float
    replaced: set[str] = field(default_factory=set)  # never chosen again for this job (as job_replan)


class _Arm:
    """One placement rule replaying a trace."""

    def __init__(self, trace: Trace, rule: str, seed: int) -> None:
        self.trace, self.rule, self.blocks = trace, rule, trace.blocks
        self.rng = np.random.default_rng(seed)
        self.true = [0.0] * self.blocks  # what serves now: the weakest-block metric
        self.view = [0.0] * self.blocks  # what placement sees: crashed records linger
        self.span: dict[int, tuple[int, int]] = {}  # providers in the view (alive, or crashed and not expired)
        self.alive: set[int] = set()  # online and not reloading
        self.online: set[int] = set()
        self.reloading: set[int] = set()  # moving: its new span is in self.span, in neither picture
        self.offers: dict[int, Offer] = {}
        self.jobs: dict[int, _Job] = {}
        self.using: dict[int, set[int]] = {}  # provider -> jobs it is a primary of
        self.moves = self.failovers = self.served = self.failed = self.skipped_checks = 0
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = len(trace.events)

    def push(self, when: float, kind: int, subject: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, subject))

    # -- spans in the two pictures
    def _add(self, picture: list[float], pid: int, span: tuple[int, int]) -> None:
        tput = self.trace.providers[pid].throughput
        for b in range(*span):
            picture[b] += tput

    def _remove(self, picture: list[float], pid: int, span: tuple[int, int]) -> None:
        tput = self.trace.providers[pid].throughput
        for b in range(*span):
            picture[b] -= tput

    def _offer(self, pid: int) -> Offer:
        p, (start, end) = self.trace.providers[pid], self.span[pid]
        return Offer(str(pid), start, end, p.price, p.throughput, p.latency_ms, 1.0)

    # -- the placement rule under test
    def choose(self, pid: int) -> tuple[int, int]:
        hold = self.trace.providers[pid].hold
        if self.rule == "petals":
            start = petals_choose_best_start(np.array(self.view), hold)
            return start, start + hold
        # choose_span's decision from the per-block sums it would compute from every span.
        return best_span(self.view, hold)

    def wants_to_move(self, pid: int) -> tuple[int, int] | None:
        p, span = self.trace.providers[pid], self.span[pid]
        if self.rule == "petals":
            if petals_cannot_gain(min(self.view), sum(self.view), self.blocks):
                return None
            spans = {
                q: (s, e, self.trace.providers[q].throughput)
                for q, (s, e) in self.span.items()
                if q not in self.reloading
            }
            if not petals_should_choose_other_blocks(pid, spans, self.blocks, self.rng):
                return None
            vacated = np.array(self.view)
            vacated[span[0] : span[1]] -= p.throughput  # it announces itself offline first
            start = petals_choose_best_start(vacated, p.hold)
            return (start, start + p.hold) if start != span[0] else None
        others = list(self.view)
        self._remove(others, pid, span)
        move, target = should_move(self.blocks, span, p.throughput, [(b, b + 1, t) for b, t in enumerate(others)])
        return target if move else None

    # -- events
    def join(self, pid: int, now: float) -> None:
        if pid in self.span:  # its crashed record has not expired: the new one replaces it
            self._remove(self.view, pid, self.span.pop(pid))
            self.offers.pop(pid, None)
        span = self.choose(pid)
        self.span[pid] = span
        self._add(self.view, pid, span)
        self._add(self.true, pid, span)
        self.online.add(pid)
        self.alive.add(pid)
        self.offers[pid] = self._offer(pid)

    def depart(self, pid: int, now: float, crashed: bool) -> None:
        self.online.discard(pid)
        if pid in self.reloading:  # it was in neither picture
            self.reloading.discard(pid)
            self.span.pop(pid)
        elif pid in self.alive:
            self.alive.discard(pid)
            self._remove(self.true, pid, self.span[pid])
        if crashed:
            self.push(now + RECORD_TTL_S[self.rule], EXPIRE, pid)
        elif pid in self.span:
            self._remove(self.view, pid, self.span.pop(pid))
            self.offers.pop(pid, None)
        self.fail_over(pid, now)

    def expire(self, pid: int) -> None:
        if pid in self.span and pid not in self.online:
            self._remove(self.view, pid, self.span.pop(pid))
            self.offers.pop(pid, None)

    def check(self, pid: int, now: float) -> None:
        if pid not in self.alive:
            self.skipped_checks += 1
            return
        target = self.wants_to_move(pid)
        if target is None:
            return
        self.moves += 1
        old = self.span[pid]
        self.alive.discard(pid)
        self.reloading.add(pid)
        self._remove(self.true, pid, old)
        self._remove(self.view, pid, old)
        self.offers.pop(pid, None)
        self.span[pid] = target
        self.fail_over(pid, now)
        self.push(now + _load_seconds(self.trace.providers[pid].hold), MOVED, pid)

    def moved(self, pid: int) -> None:
        if pid not in self.reloading:  # it left or crashed while reloading
            return
        self.reloading.discard(pid)
        self.alive.add(pid)
        self._add(self.true, pid, self.span[pid])
        self._add(self.view, pid, self.span[pid])
        self.offers[pid] = self._offer(pid)

    # -- jobs
    def start_job(self, jid: int, tokens: int, now: float) -> None:
        job = JobRequest(num_blocks=self.blocks, kind="inference", max_price=10**6, budget=10**15, backups=2)
        try:
            plan = match_job(job, list(self.offers.values()))
        except NoPlanError:
            self.failed += 1
            return
        self.jobs[jid] = _Job(job, plan, now + tokens * plan.latency_ms / 1000.0)
        self._track(jid, plan)
        # A plan onto a crashed provider whose record lingers fails at once: the client fails over.
        for primary in sorted(plan.primaries):
            if jid in self.jobs and primary in self.jobs[jid].plan.primaries and int(primary) not in self.alive:
                self._replace(jid, int(primary))
        if jid in self.jobs:
            self.push(self.jobs[jid].done, DONE, jid)

    def _track(self, jid: int, plan: Plan) -> None:
        for primary in plan.primaries:
            self.using.setdefault(int(primary), set()).add(jid)

    def _untrack(self, jid: int, plan: Plan) -> None:
        for primary in plan.primaries:
            self.using.get(int(primary), set()).discard(jid)

    def fail_over(self, pid: int, now: float) -> None:
        for jid in sorted(self.using.pop(pid, set())):
            if jid in self.jobs:
                self._replace(jid, pid)

    def _replace(self, jid: int, failed: int) -> None:
        """The client reports ``failed``; the scheduler replans its segments (retrying while
        the replacement turns out dead too)."""
        state = self.jobs[jid]
        self._untrack(jid, state.plan)
        plan, bad = state.plan, str(failed)
        for _ in range(8):
            self.failovers += 1
            state.replaced.add(bad)
            offers = [o for o in self.offers.values() if o.provider_id not in state.replaced]
            try:
                new = replan_segment(plan, bad, offers, state.job)
            except NoPlanError:
                break
            kept = [s for s in plan.segments if s.primary != bad]
            plan = Plan(
                kind=plan.kind,
                num_blocks=plan.num_blocks,
                segments=tuple(sorted(kept + list(new), key=lambda s: s.start)),
            )
            dead = sorted(p for p in plan.primaries if int(p) not in self.alive)
            if not dead:
                state.plan = plan
                self._track(jid, plan)
                return
            bad = dead[0]
        del self.jobs[jid]
        self.failed += 1

    def finish(self, jid: int) -> None:
        state = self.jobs.pop(jid, None)
        if state is not None:
            self._untrack(jid, state.plan)
            self.served += 1


def simulate(trace: Trace, rule: str, *, seed: int = 0) -> dict[str, object]:
    """Replay ``trace`` under ``rule`` (``"hivemart"`` or ``"petals"``)."""
    if rule not in ("hivemart", "petals"):
        raise ValueError(f"rule must be hivemart or petals, got {rule!r}")
    arm = _Arm(trace, rule, seed)
    arm.heap = list(trace.events)
    heapq.heapify(arm.heap)
    horizon = trace.hours * 3600.0
    hourly = [0.0] * trace.hours
    clock, jobs = 0.0, 0
    while arm.heap and arm.heap[0][0] < horizon:
        now, _, kind, subject = heapq.heappop(arm.heap)
        weakest = min(arm.true)
        while clock < now:  # integrate the weakest block's throughput, hour by hour
            hour_end = min(now, (int(clock // 3600) + 1) * 3600.0)
            hourly[int(clock // 3600)] += weakest * (hour_end - clock)
            clock = hour_end
        if kind == JOIN:
            arm.join(subject, now)
        elif kind in (LEAVE, CRASH):
            arm.depart(subject, now, crashed=kind == CRASH)
        elif kind == EXPIRE:
            arm.expire(subject)
        elif kind == CHECK:
            arm.check(subject, now)
        elif kind == MOVED:
            arm.moved(subject)
        elif kind == JOB:
            jobs += 1
            arm.start_job(jobs, subject, now)
        elif kind == DONE:
            arm.finish(subject)
    weakest = min(arm.true)
    while clock < horizon:
        hour_end = (int(clock // 3600) + 1) * 3600.0
        hourly[int(clock // 3600)] += weakest * (hour_end - clock)
        clock = hour_end
    return {
        "weakest_throughput": [round(h / 3600.0, 1) for h in hourly],
        "moves": arm.moves,
        "failovers": arm.failovers,
        "jobs_served": arm.served,
        "jobs_failed": arm.failed,
        "jobs_running_at_end": len(arm.jobs),
        "online_at_end": len(arm.online),
    }


def run_swarm_sim(
    *,
    providers: int = 10_000,
    blocks: int = 80,
    hours: int = 24,
    seed: int = 0,
    checks_per_hour: int = 60,
    jobs_per_hour: int = 20,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, object]:
    """Both rules on one trace; the last line's fields first, then details."""
    began = time.perf_counter()
    trace = make_trace(
        providers, blocks, hours, seed=seed, checks_per_hour=checks_per_hour, jobs_per_hour=jobs_per_hour
    )
    progress(f"trace: {len(trace.events)} events, {int(trace.stats['sessions'])} sessions")
    ours = simulate(trace, "hivemart", seed=seed)
    progress(f"hivemart rule done after {time.perf_counter() - began:.1f} s")
    theirs = simulate(trace, "petals", seed=seed)
    progress(f"petals rule done after {time.perf_counter() - began:.1f} s")
    return {
        "providers": providers,
        "blocks": blocks,
        "hours": hours,
        "weakest_throughput": ours["weakest_throughput"],
        "petals_weakest_throughput": theirs["weakest_throughput"],
        "moves": ours["moves"],
        "petals_moves": theirs["moves"],
        "jobs_served": ours["jobs_served"],
        "petals_jobs_served": theirs["jobs_served"],
        "failovers": ours["failovers"],
        "petals_failovers": theirs["failovers"],
        "jobs_failed": ours["jobs_failed"],
        "petals_jobs_failed": theirs["jobs_failed"],
        "seed": seed,
        "checks_per_hour": checks_per_hour,
        "jobs_per_hour": jobs_per_hour,
        "sessions": int(trace.stats["sessions"]),
        "crashes": int(trace.stats["crashes"]),
        "run_seconds": round(time.perf_counter() - began, 1),
    }
