"""Matching a job to providers: which provider serves which blocks, with ranked backups.

Pure Python plus NumPy; no Django, no Celery. The scheduler's ``job_match`` task reads
rows, builds a :class:`JobRequest` and :class:`Offer` objects, calls :func:`match_job`
and stores the :class:`Plan` (``Plan.to_dict()``).

Model
-----
A model has ``L`` transformer blocks ``0..L-1``; a plan is a chain of segments
``[s, e)`` (half-open, as everywhere in Hivemart) that cover them exactly once. A
provider may be asked for any sub-range of the span it offers. For one segment of ``b``
blocks served by offer ``o``:

- latency (ms per token) = ``o.latency_ms + b * 1000 / o.throughput``: one network hop,
  then ``b`` blocks of compute. ``Offer.throughput`` is tokens per second through *one*
  block, the unit provider agents measure and announce, so ``o.throughput / b`` is the
  tokens per second the segment sustains.
- cost = ``o.price * b * passes`` micro-credits per million tokens, where ``passes`` is
  the work units one token costs per block: 1 for inference, 3 for fine-tuning (a
  forward, and a backward that counts ``BACKWARD_WORK_FACTOR`` = 2 times, as providers
  charge it: ``hivemart_core.protocol.receipts.work_units``). Integers: no float touches money.

A chain's latency ``x`` and cost ``y`` are the sums over its segments; its throughput
is its bottleneck, the minimum over segments of ``o.throughput / b``.

Constraints (a segment is *eligible* when all hold):

- ``o.price <= job.max_price`` (the price cap);
- ``o.reliability >= job.reliability_floor``;
- with ``job.min_throughput`` set, ``o.throughput / b >= job.min_throughput``: no
  segment is slower than the floor, which caps how many blocks a slow provider may take;
- the provider is not excluded (e.g. the one that just failed).

Objective
---------
- **inference**: minimise ``(x, y)`` lexicographically: the lowest expected per-token
  latency, ties broken by the lower cost.
- **finetune**: maximise throughput per credit, ``(1000 / x) / (y / 10**6)``, i.e.
  minimise the product ``x * y``; ties broken by lower ``x``, then lower ``y``. Training
  runs the chain sequentially (forward through every hop, then backward in reverse), so a
  token's time is the chain's summed latency, not its bottleneck. The forward latency
  stands for it: the backward retraces the same hops with about twice the compute.

Method (exact)
--------------
The chain is a shortest path over block boundaries ``0..L`` (a DAG with ``L(L+1)/2``
edges). For every edge ``(s, e)`` the best eligible offer is found for all edges at once,
per segment length ``b``: each offer's value on ``b`` blocks lands in a grid cell
``[a, c)`` of its span, and a running minimum over ``a <= s`` and then over
``c >= s + b`` leaves, on the grid's diagonal, the best offer whose span contains each
``[s, s + b)``. That is ``O(N L + L^3)`` NumPy work rather than ``O(N L^2)`` Python, and
the same for any segment boundaries (a throughput floor makes boundaries that are no span
end necessary). For inference the (latency, cost) pairs ride in complex numbers, which
NumPy orders real part first, so latency ties go to the cheaper offer exactly.

The fine-tuning product is not additive, but ``sqrt(x * y)`` is concave on the positive
quadrant, so the best chain is a vertex of the lower-left convex hull of all chains'
``(x, y)`` points, and each hull vertex is the shortest path for some weights of
``λx + μy``. :func:`_min_product` explores the hull by branch and bound from its two ends
(least latency, least cost), pruning with the product's lower bound over the triangle in
which the vertices between two known ones must lie. On random swarms of 10,000 offers
that is 8 to 12 shortest paths; exact up to floating-point rounding of latencies.

Every block covered by an eligible offer means a plan exists (one-block segments always
pass the throughput floor of an eligible offer), so :class:`NoPlanError` names the
uncovered blocks and the limit that left them uncovered, e.g. the price that would be
needed. The budget is checked after optimising: a plan whose single token costs more
than the budget is refused (the budget is the hold; it does not otherwise steer the
choice).

Backups for a segment are other eligible providers covering all of its blocks, ranked
by the plan's objective with the backup in the primary's place; providers that are not
primaries anywhere in the plan come first, so one failure does not take out a primary
and its backup at once. Exact ties anywhere go to the smallest provider id, so a plan does
not depend on the order of the offers.

Known limits: a provider may be the primary of more than one segment when that is best
(each segment is a hop of its own); the throughput floor is checked per segment, not
against a provider's blocks summed over the plan; reliability is a floor, not a term of
the expected latency.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

import numpy as np

from hivemart_core.protocol.receipts import BACKWARD_WORK_FACTOR

__all__ = [
    "JobRequest",
    "Offer",
    "Segment",
    "Plan",
    "Gap",
    "match_job",
    "replan_segment",
    "MatchingError",
    "InvalidInputError",
    "InvalidJobError",
    "InvalidOfferError",
    "InvalidPlanError",
    "NoPlanError",
    "KINDS",
    "MAX_BLOCKS",
    "MAX_PRICE",
]

Kind = Literal["inference", "finetune"]
KINDS: tuple[str, ...] = ("inference", "finetune")
# Work units per token per block, as providers charge them (``work_units``): a fine-tuning
# token is a forward and a backward, which counts BACKWARD_WORK_FACTOR times.
_PASSES = {"inference": 1, "finetune": 1 + BACKWARD_WORK_FACTOR}
# Bounds that keep every cost sum below 2**53, so the float64 arrays compare costs exactly.
MAX_BLOCKS = 1000
MAX_PRICE = 10**12
_MAX_BACKUPS = 64


# --- errors ----------------------------------------------------------------------------------


class MatchingError(Exception):
    """Root of what this module raises on purpose."""


class InvalidInputError(MatchingError, ValueError):
    """A job, offer or plan given to the matcher is malformed."""


class InvalidJobError(InvalidInputError):
    pass


class InvalidOfferError(InvalidInputError):
    pass


class InvalidPlanError(InvalidInputError):
    pass


GapReason = Literal["no_offers", "excluded", "price", "reliability", "throughput", "limits"]


@dataclass(frozen=True)
class Gap:
    """Blocks ``[start, end)`` that no eligible offer serves, and why.

    ``reason``: ``no_offers`` (nobody offers them), ``excluded`` (only excluded providers
    do), ``price`` (only above the price cap; ``needed_price`` is the lowest cap that
    covers every block of the gap), ``reliability`` (only below the floor;
    ``best_reliability`` is the floor that would), ``throughput`` (only slower than the
    floor; ``best_throughput`` is the floor that would), ``limits`` (offers there fail
    several limits at once).
    """

    start: int
    end: int
    reason: GapReason
    needed_price: int | None = None
    best_reliability: float | None = None
    best_throughput: float | None = None

    def describe(self) -> str:
        blocks = f"blocks {self.start}..{self.end}"
        if self.reason == "no_offers":
            return f"no provider offers {blocks}"
        if self.reason == "excluded":
            return f"{blocks} are served only by excluded providers"
        if self.reason == "price":
            return (
                f"{blocks} are served only at >= {self.needed_price} micro-credits per million units; raise max_price"
            )
        if self.reason == "reliability":
            return (
                f"{blocks} are served only by providers below the reliability floor (best {self.best_reliability:g}); "
                "lower reliability_floor"
            )
        if self.reason == "throughput":
            return (
                f"{blocks} are served only by providers slower than min_throughput "
                f"(best {self.best_throughput:g} tokens/s per block); lower min_throughput"
            )
        return f"{blocks} are served only by offers that fail several limits at once (price, reliability, throughput)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "needed_price": self.needed_price,
            "best_reliability": self.best_reliability,
            "best_throughput": self.best_throughput,
        }


class NoPlanError(MatchingError):
    """No plan satisfies the job. ``gaps`` lists the blocks no eligible offer serves (in
    block order); ``needed_budget`` is set when the blocks are covered but the budget does
    not pay for one token. ``code`` and ``extra`` follow the API's error shape."""

    code = "no_plan"

    def __init__(self, *, gaps: Sequence[Gap] = (), needed_budget: int | None = None) -> None:
        self.gaps = tuple(gaps)
        self.needed_budget = needed_budget
        parts = [gap.describe() for gap in self.gaps]
        if needed_budget is not None:
            parts.append(f"the budget does not pay for one token of the best plan; raise budget to >= {needed_budget}")
        super().__init__("no plan for the job: " + "; ".join(parts))

    @property
    def extra(self) -> dict[str, Any]:
        return {"gaps": [gap.to_dict() for gap in self.gaps], "needed_budget": self.needed_budget}


# --- inputs ----------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a job asks of the swarm."""

    num_blocks: int  # L: the model's transformer blocks, served as 0..L-1
    kind: Kind  # "inference" or "finetune": picks the objective (module docstring)
    max_price: int  # price cap, micro-credits per million work units
    budget: int  # micro-credits held for the job; must pay for at least one token
    min_throughput: float | None = None  # tokens/s every segment must sustain; None: no floor
    backups: int = 2  # K: ranked backups wanted per segment
    reliability_floor: float = 0.0  # offers below this reliability in [0, 1] are not used

    def __post_init__(self) -> None:
        if not _is_int(self.num_blocks) or not 1 <= self.num_blocks <= MAX_BLOCKS:
            raise InvalidJobError(f"num_blocks must be an integer in 1..{MAX_BLOCKS}, got {self.num_blocks!r}")
        if self.kind not in KINDS:
            raise InvalidJobError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not _is_int(self.max_price) or not 0 <= self.max_price <= MAX_PRICE:
            raise InvalidJobError(
                f"max_price must be an integer in 0..{MAX_PRICE} micro-credits per million units, "
                f"got {self.max_price!r}"
            )
        if not _is_int(self.budget) or self.budget < 0:
            raise InvalidJobError(f"budget must be a non-negative integer of micro-credits, got {self.budget!r}")
        if self.min_throughput is not None and not (_is_number(self.min_throughput) and self.min_throughput > 0):
            raise InvalidJobError(
                f"min_throughput must be a positive number of tokens/s or None, got {self.min_throughput!r}"
            )
        if not _is_int(self.backups) or not 0 <= self.backups <= _MAX_BACKUPS:
            raise InvalidJobError(f"backups must be an integer in 0..{_MAX_BACKUPS}, got {self.backups!r}")
        if not _is_number(self.reliability_floor) or not 0.0 <= self.reliability_floor <= 1.0:
            raise InvalidJobError(f"reliability_floor must be in [0, 1], got {self.reliability_floor!r}")

    @property
    def passes(self) -> int:
        """Work units one token costs per block for this kind of job."""
        return _PASSES[self.kind]


@dataclass(frozen=True, slots=True)
class Offer:
    """A provider's standing offer for one model, with the scheduler's measurements."""

    provider_id: str
    start: int  # first block of the span it serves
    end: int  # one past its last block; any sub-range of [start, end) may be asked for
    price: int  # micro-credits per million work units
    throughput: float  # measured tokens/s through one block (b blocks: throughput / b tokens/s)
    latency_ms: float  # measured cost of one hop to this provider, ms per token
    reliability: float  # measured share of requests answered correctly, in [0, 1]

    def __post_init__(self) -> None:
        who = f"offer of provider {self.provider_id!r}"
        if not isinstance(self.provider_id, str) or not self.provider_id:
            raise InvalidOfferError(f"provider_id must be a non-empty string, got {self.provider_id!r}")
        if not _is_int(self.start) or not _is_int(self.end) or self.start < 0:
            raise InvalidOfferError(f"{who}: span must be non-negative integers, got [{self.start!r}, {self.end!r})")
        if self.end <= self.start:
            raise InvalidOfferError(f"{who}: span [{self.start}, {self.end}) is empty")
        if not _is_int(self.price) or self.price < 0:
            raise InvalidOfferError(f"{who}: price must be a non-negative integer, got {self.price!r}")
        if self.price > MAX_PRICE:
            raise InvalidOfferError(f"{who}: price {self.price} is above the largest accepted, {MAX_PRICE}")
        if not _is_number(self.throughput) or self.throughput <= 0:
            raise InvalidOfferError(f"{who}: throughput must be a positive number of tokens/s, got {self.throughput!r}")
        if not _is_number(self.latency_ms) or self.latency_ms < 0:
            raise InvalidOfferError(f"{who}: latency_ms must be a non-negative number, got {self.latency_ms!r}")
        if not _is_number(self.reliability) or not 0.0 <= self.reliability <= 1.0:
            raise InvalidOfferError(f"{who}: reliability must be in [0, 1], got {self.reliability!r}")

    def segment_latency_ms(self, blocks: int) -> float:
        """Expected per-token latency of serving ``blocks`` of its blocks: one hop plus compute."""
        return self.latency_ms + blocks * (1000.0 / self.throughput)


# --- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """Blocks ``[start, end)`` served by ``primary``, with ``backups`` best first.

    ``price``, ``latency_ms`` and ``throughput`` describe the primary on these blocks:
    its price, its per-token latency (hop plus compute) and the tokens/s it sustains."""

    start: int
    end: int
    primary: str
    backups: tuple[str, ...]
    price: int
    latency_ms: float
    throughput: float

    def __post_init__(self) -> None:
        if not _is_int(self.start) or not _is_int(self.end) or not 0 <= self.start < self.end:
            raise InvalidPlanError(
                f"segment span must be non-empty non-negative integers, got [{self.start!r}, {self.end!r})"
            )
        if not isinstance(self.primary, str) or not self.primary:
            raise InvalidPlanError(f"segment {self.start}..{self.end}: primary must be a provider id")
        if not all(isinstance(b, str) and b for b in self.backups) or len(set(self.backups)) != len(self.backups):
            raise InvalidPlanError(f"segment {self.start}..{self.end}: backups must be distinct provider ids")
        if self.primary in self.backups:
            raise InvalidPlanError(
                f"segment {self.start}..{self.end}: provider {self.primary} is both primary and backup"
            )
        if not _is_int(self.price) or self.price < 0:
            raise InvalidPlanError(f"segment {self.start}..{self.end}: price must be a non-negative integer")
        if (
            not _is_number(self.latency_ms)
            or self.latency_ms < 0
            or not _is_number(self.throughput)
            or self.throughput <= 0
        ):
            raise InvalidPlanError(
                f"segment {self.start}..{self.end}: latency_ms and throughput must be finite, non-negative and positive"
            )

    @property
    def blocks(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "primary": self.primary,
            "backups": list(self.backups),
            "price": self.price,
            "latency_ms": self.latency_ms,
            "throughput": self.throughput,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Segment:
        try:
            return cls(
                start=data["start"],
                end=data["end"],
                primary=data["primary"],
                backups=tuple(data["backups"]),
                price=data["price"],
                latency_ms=data["latency_ms"],
                throughput=data["throughput"],
            )
        except (KeyError, TypeError) as exc:
            raise InvalidPlanError(f"malformed segment {data!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Plan:
    """A chain of segments covering blocks ``0..num_blocks`` exactly once, in order."""

    kind: Kind
    num_blocks: int
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidPlanError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not _is_int(self.num_blocks) or self.num_blocks < 1:
            raise InvalidPlanError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        boundary = 0
        for segment in self.segments:
            if segment.start != boundary:
                raise InvalidPlanError(
                    f"segments must cover blocks 0..{self.num_blocks} in order; "
                    f"segment {segment.start}..{segment.end} follows boundary {boundary}"
                )
            boundary = segment.end
        if boundary != self.num_blocks:
            raise InvalidPlanError(f"segments end at block {boundary}, not at {self.num_blocks}")

    @property
    def latency_ms(self) -> float:
        """Expected per-token latency through the whole chain, ms."""
        return sum(segment.latency_ms for segment in self.segments)

    @property
    def cost_per_million_tokens(self) -> int:
        """Micro-credits a million tokens cost through the whole chain (all passes)."""
        return sum(segment.price * segment.blocks for segment in self.segments) * _PASSES[self.kind]

    @property
    def price(self) -> int:
        """The chain's blended price, micro-credits per million work units, rounded up."""
        return -(-sum(segment.price * segment.blocks for segment in self.segments) // self.num_blocks)

    @property
    def throughput(self) -> float:
        """Bottleneck tokens/s: the slowest segment's."""
        return min(segment.throughput for segment in self.segments)

    @property
    def primaries(self) -> frozenset[str]:
        return frozenset(segment.primary for segment in self.segments)

    @property
    def objective(self) -> tuple[float, ...]:
        """What the matcher minimised (lexicographically): see the module docstring."""
        latency, cost = self.latency_ms, self.cost_per_million_tokens
        if self.kind == "inference":
            return (latency, cost)
        return (latency * cost, latency, cost)

    def max_tokens(self, budget: int) -> int | None:
        """Tokens ``budget`` micro-credits pay for at this plan's cost; None when it is free."""
        cost = self.cost_per_million_tokens
        return None if cost == 0 else budget * 1_000_000 // cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_blocks": self.num_blocks,
            "segments": [segment.to_dict() for segment in self.segments],
            "latency_ms": self.latency_ms,
            "cost_per_million_tokens": self.cost_per_million_tokens,
            "price": self.price,
            "throughput": self.throughput,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan stored with :meth:`to_dict` (derived figures are recomputed)."""
        try:
            segments = tuple(Segment.from_dict(item) for item in data["segments"])
            return cls(kind=data["kind"], num_blocks=data["num_blocks"], segments=segments)
        except (KeyError, TypeError) as exc:
            raise InvalidPlanError(f"malformed plan: {exc}") from exc


# --- eligible offers as arrays ---------------------------------------------------------------

_INF = complex(np.inf, np.inf)


def _column(offers: Sequence[Offer], name: str, dtype: type) -> np.ndarray:
    return np.fromiter(map(attrgetter(name), offers), dtype=dtype, count=len(offers))


class _Columns:
    """Every offer's figures as arrays, checked against the model (spans inside it, one
    offer per provider)."""

    def __init__(self, offers: Sequence[Offer], num_blocks: int) -> None:
        for offer in offers:
            if not isinstance(offer, Offer):
                raise InvalidOfferError(f"expected Offer objects, got {type(offer).__name__}")
        self.offers = offers
        self.ids = [offer.provider_id for offer in offers]
        if len(set(self.ids)) != len(self.ids):
            seen: set[str] = set()
            duplicate = next(i for i in self.ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise InvalidOfferError(f"provider {duplicate!r} has more than one offer; send one offer per provider")
        self.start = _column(offers, "start", np.int64)
        self.end = _column(offers, "end", np.int64)
        self.price = _column(offers, "price", np.int64)
        self.throughput = _column(offers, "throughput", np.float64)
        self.latency = _column(offers, "latency_ms", np.float64)
        self.reliability = _column(offers, "reliability", np.float64)
        if len(offers) and int(self.end.max()) > num_blocks:
            bad = offers[int(np.argmax(self.end))]
            raise InvalidOfferError(
                f"offer of provider {bad.provider_id!r} spans blocks {bad.start}..{bad.end}, "
                f"beyond the model's {num_blocks} blocks"
            )

    def allowed(self, excluded: frozenset[str]) -> np.ndarray:
        if not excluded:
            return np.ones(len(self.ids), dtype=bool)
        return np.fromiter((i not in excluded for i in self.ids), dtype=bool, count=len(self.ids))


def _segment_caps(throughput: np.ndarray, length: np.ndarray, min_throughput: float | None) -> np.ndarray:
    """The most blocks each offer may take and still sustain ``min_throughput``
    (``throughput / b >= min_throughput``, the very comparison the docs state)."""
    if min_throughput is None:
        return length.copy()
    most = np.floor(throughput / min_throughput)
    # The division may round to either side of an integer; settle it with the real test.
    most = np.where(throughput / (most + 1) >= min_throughput, most + 1, most)
    most = np.where(throughput / np.maximum(most, 1) >= min_throughput, most, most - 1)
    return np.minimum(np.maximum(most, 0).astype(np.int64), length)


class _Swarm:
    """The eligible offers, sorted by span length (longest first), then start: the offers
    at least ``b`` blocks long are a prefix, and offers with equal spans are neighbours."""

    def __init__(self, job: JobRequest, columns: _Columns, excluded: frozenset[str]) -> None:
        self.num_blocks, self.passes, self.columns, self.excluded = job.num_blocks, job.passes, columns, excluded
        eligible = (columns.price <= job.max_price) & (columns.reliability >= job.reliability_floor)
        if job.min_throughput is not None:
            eligible &= columns.throughput >= job.min_throughput
        eligible &= columns.allowed(excluded)
        chosen = np.flatnonzero(eligible)
        order = chosen[np.lexsort((columns.start[chosen], columns.start[chosen] - columns.end[chosen]))]
        self.source = order.tolist()  # position in the caller's offers
        self.start, self.end = columns.start[order], columns.end[order]
        length = self.end - self.start
        self.cap = _segment_caps(columns.throughput[order], length, job.min_throughput)
        self.capped = job.min_throughput is not None
        self.hop = columns.latency[order]
        self.ms_per_block = 1000.0 / columns.throughput[order]
        self.unit_cost = (columns.price[order] * job.passes).astype(np.float64)
        changes = np.flatnonzero((self.start[1:] != self.start[:-1]) | (self.end[1:] != self.end[:-1])) + 1
        self.group_first = np.concatenate(([0], changes)).astype(np.int64) if len(order) else changes
        self.group_start, self.group_end = self.start[self.group_first], self.end[self.group_first]
        self.cell = self.start * (self.num_blocks + 1) + self.end  # flat index of [start, end) in a table
        at_least = -np.arange(self.num_blocks + 2)
        self.offers_at_least: list[int] = np.searchsorted(-length, at_least, side="right").tolist()
        self.groups_at_least: list[int] = np.searchsorted(-length[self.group_first], at_least, side="right").tolist()
        self.max_length = int(self.cap.max()) if len(order) else 0

    def offer(self, index: int) -> Offer:
        return self.columns.offers[self.source[index]]

    def provider(self, index: int) -> str:
        return self.columns.ids[self.source[index]]


# --- the chain -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    """An offer's value on ``b`` blocks: ``key + b * key_per_block``, arrays over the
    swarm's offers. With ``tie`` set, exact ties in that go to the lower
    ``tie + b * tie_per_block``: the pair rides in a complex number, which NumPy orders by
    real part, then imaginary part."""

    key: np.ndarray
    key_per_block: np.ndarray
    tie: np.ndarray | None = None
    tie_per_block: np.ndarray | None = None

    @property
    def lexicographic(self) -> bool:
        return self.tie is not None

    def values(self, offers: slice | np.ndarray, blocks: int) -> np.ndarray:
        """The given offers' values on ``blocks`` blocks."""
        value = self.key[offers] + blocks * self.key_per_block[offers]
        if self.tie is None or self.tie_per_block is None:
            return value
        pair = np.empty(len(value), dtype=np.complex128)
        pair.real = value
        pair.imag = self.tie[offers] + blocks * self.tie_per_block[offers]
        return pair


def _latency_first(swarm: _Swarm) -> _Weights:
    return _Weights(swarm.hop, swarm.ms_per_block, np.zeros_like(swarm.hop), swarm.unit_cost)


def _blend(swarm: _Swarm, on_latency: float, on_cost: float) -> _Weights:
    return _Weights(on_latency * swarm.hop, on_latency * swarm.ms_per_block + on_cost * swarm.unit_cost)


def _edge_table(swarm: _Swarm, weights: _Weights) -> np.ndarray:
    """``table[s, e]``: the best value of any eligible offer serving blocks ``[s, e)``."""
    size = swarm.num_blocks + 1
    worst = _INF if weights.lexicographic else np.inf
    table = np.full((size, size), worst)
    scratch = np.empty((size, size), dtype=table.dtype)
    for blocks in range(1, swarm.max_length + 1):
        stop = swarm.offers_at_least[blocks]
        value = weights.values(slice(0, stop), blocks)
        if swarm.capped:
            value[swarm.cap[:stop] < blocks] = worst
        # grid[a, c - blocks] (a view of scratch[a, c]): the best offer spanning exactly
        # [a, c). A running minimum over a <= s, then over c >= s + blocks, leaves on the
        # diagonal the best offer whose span contains [s, s + blocks).
        width = size - blocks
        grid = scratch[:width, blocks:]
        grid.fill(worst)
        if weights.lexicographic:
            # ufunc.at has no fast path for complex numbers: reduce each span's offers first.
            groups = swarm.groups_at_least[blocks]
            grid[swarm.group_start[:groups], swarm.group_end[:groups] - blocks] = np.minimum.reduceat(
                value, swarm.group_first[:groups]
            )
        else:
            np.minimum.at(scratch.reshape(-1), swarm.cell[:stop], value)
        np.minimum.accumulate(grid, axis=0, out=grid)
        np.minimum.accumulate(grid[:, ::-1], axis=1, out=grid[:, ::-1])
        table.reshape(-1)[blocks : blocks + width * (size + 1) : size + 1] = np.diagonal(grid)
    return table


def _shortest_chain(table: np.ndarray, start: int, end: int) -> list[tuple[int, int]] | None:
    """The best chain of edges from boundary ``start`` to ``end``, or None if there is none."""
    span = end - start
    # into[e - start, s - start]: the edge s -> e, so that each step reads a contiguous row.
    into = table[start : end + 1, start : end + 1].T.copy()
    dist = np.full(span + 1, np.inf, dtype=table.dtype)
    dist[0] = 0
    came_from = [0] * (span + 1)
    for k in range(1, span + 1):
        candidates = dist[:k] + into[k, :k]
        best = int(candidates.argmin())  # the first of equals: the earliest boundary
        dist[k] = candidates[best]
        came_from[k] = best
    if not math.isfinite(dist[span].real):
        return None
    edges: list[tuple[int, int]] = []
    k = span
    while k:
        edges.append((start + came_from[k], start + k))
        k = came_from[k]
    return edges[::-1]


def _covering(swarm: _Swarm, start: int, end: int) -> np.ndarray:
    """Indices of the eligible offers that may serve all of ``[start, end)``."""
    blocks = end - start
    stop = swarm.offers_at_least[blocks]
    mask = (swarm.start[:stop] <= start) & (swarm.end[:stop] >= end) & (swarm.cap[:stop] >= blocks)
    return np.flatnonzero(mask)


def _best_offer(swarm: _Swarm, weights: _Weights, start: int, end: int) -> int:
    """The offer the table chose for ``[start, end)`` (the same arithmetic, so the same
    minimum); exact ties go to the smallest provider id, so a plan never depends on the
    order the offers came in."""
    candidates = _covering(swarm, start, end)
    values = weights.values(candidates, end - start)
    tied = candidates[values == values.min()]
    return min(tied.tolist(), key=swarm.provider)


@dataclass(frozen=True)
class _Chain:
    parts: tuple[tuple[int, int, int], ...]  # (start, end, swarm index of the primary)
    latency: float
    cost: int


def _chain(swarm: _Swarm, weights: _Weights, start: int, end: int) -> _Chain | None:
    edges = _shortest_chain(_edge_table(swarm, weights), start, end)
    if edges is None:
        return None
    parts = tuple((s, e, _best_offer(swarm, weights, s, e)) for s, e in edges)
    latency = sum(swarm.offer(i).segment_latency_ms(e - s) for s, e, i in parts)
    cost = sum(swarm.offer(i).price * (e - s) for s, e, i in parts) * swarm.passes
    return _Chain(parts, latency, cost)


def _solve(swarm: _Swarm, kind: str, start: int, end: int, rest: tuple[float, int] = (0.0, 0)) -> _Chain | None:
    """The best chain over ``[start, end)``, or None if some block has no eligible offer.
    ``rest`` is the latency and cost of the plan's other segments, part of the fine-tuning
    product."""
    if kind == "inference":
        return _chain(swarm, _latency_first(swarm), start, end)
    # The hull's two ends need no tie-break: a tied point with a lower other coordinate
    # lies strictly below the segment between them, where the walk finds it.
    fastest = _chain(swarm, _blend(swarm, 1.0, 0.0), start, end)
    if fastest is None:
        return None
    cheapest = _require(_chain(swarm, _blend(swarm, 0.0, 1.0), start, end))
    return _min_product(swarm, start, end, fastest, cheapest, rest)


def _require(found: _Chain | None) -> _Chain:
    # Weights change which offer wins an edge, never whether the edge exists.
    if found is None:
        raise AssertionError("a chain exists under some weights but not under others")
    return found


def _min_product(
    swarm: _Swarm, start: int, end: int, fastest: _Chain, cheapest: _Chain, rest: tuple[float, int]
) -> _Chain:
    """The chain minimising ``(latency + rest latency) * (cost + rest cost)``.

    Branch and bound over the lower-left hull of the chains' (latency, cost) points. Each
    hull vertex found comes with a line supporting all chains (the weights it is optimal
    for; a vertical line for the fastest chain, a horizontal one for the cheapest). Any
    vertex between two known ones lies in the triangle they form with the crossing of
    their supporting lines; the product, quasi-concave, is lowest over that triangle at
    one of its corners, so a triangle whose corners cannot beat the best chain so far is
    dropped unexplored."""
    rest_latency, rest_cost = rest

    def product(latency: float, cost: float) -> float:
        return (latency + rest_latency) * (cost + rest_cost)

    def key(c: _Chain) -> tuple[float, float, int]:
        return (product(c.latency, c.cost), c.latency, c.cost)

    best = min((fastest, cheapest), key=key)
    # (bound, tiebreak, left, right, left's normal, right's normal); normals as (on latency, on cost).
    pending: list[tuple[float, int, _Chain, _Chain, tuple[float, float], tuple[float, float]]] = []
    counter = 0

    def push(left: _Chain, right: _Chain, left_normal: tuple[float, float], right_normal: tuple[float, float]) -> None:
        nonlocal counter
        if not (left.latency < right.latency and left.cost > right.cost):
            return  # equal or dominated ends: no vertex between them
        # The triangle lies in the box [left.latency, right.latency] x [right.cost, left.cost];
        # clamping keeps rounding from pushing the corner out of it.
        latency, cost = _crossing(left_normal, left, right_normal, right) or (left.latency, right.cost)
        latency = min(max(latency, left.latency), right.latency)
        cost = min(max(cost, right.cost), left.cost)
        bound = min(product(latency, cost), product(left.latency, left.cost), product(right.latency, right.cost))
        counter += 1
        heapq.heappush(pending, (bound, counter, left, right, left_normal, right_normal))

    push(fastest, cheapest, (1.0, 0.0), (0.0, 1.0))
    while pending:
        bound, _, left, right, left_normal, right_normal = heapq.heappop(pending)
        best_product = key(best)[0]
        if bound > best_product + 1e-12 * abs(best_product):
            break  # the heap is ordered by bound: no remaining triangle can do better
        normal = (float(left.cost - right.cost), right.latency - left.latency)
        middle = _require(_chain(swarm, _blend(swarm, *normal), start, end))
        line = normal[0] * left.latency + normal[1] * left.cost
        if normal[0] * middle.latency + normal[1] * middle.cost < line - 1e-12 * abs(line):
            best = min(best, middle, key=key)
            push(left, middle, left_normal, normal)
            push(middle, right, normal, right_normal)
    return best


def _crossing(
    first_normal: tuple[float, float], first: _Chain, second_normal: tuple[float, float], second: _Chain
) -> tuple[float, float] | None:
    """Where the line through ``first`` with ``first_normal`` meets the one through
    ``second`` with ``second_normal``; None when they are parallel."""
    a1, b1 = first_normal
    a2, b2 = second_normal
    c1 = a1 * first.latency + b1 * first.cost
    c2 = a2 * second.latency + b2 * second.cost
    det = a1 * b2 - a2 * b1
    if det == 0:
        return None
    return ((c1 * b2 - c2 * b1) / det, (a1 * c2 - a2 * c1) / det)


# --- segments and backups --------------------------------------------------------------------


def _segments(
    swarm: _Swarm, job: JobRequest, chain: _Chain, totals: tuple[float, int], avoid_as_backup: frozenset[str]
) -> list[Segment]:
    """Segments for ``chain``, with up to ``job.backups`` backups each. ``totals`` is the
    whole plan's latency and cost; providers in ``avoid_as_backup`` rank after the rest."""
    total_latency, total_cost = totals
    segments = []
    for start, end, index in chain.parts:
        primary = swarm.offer(index)
        blocks = end - start
        latency = primary.segment_latency_ms(blocks)
        backups = _backups(
            swarm,
            job,
            start,
            end,
            index,
            total_latency - latency,
            total_cost - primary.price * blocks * swarm.passes,
            avoid_as_backup,
        )
        segments.append(
            Segment(
                start=start,
                end=end,
                primary=primary.provider_id,
                backups=backups,
                price=primary.price,
                latency_ms=latency,
                throughput=primary.throughput / blocks,
            )
        )
    return segments


def _backups(
    swarm: _Swarm,
    job: JobRequest,
    start: int,
    end: int,
    primary: int,
    rest_latency: float,
    rest_cost: int,
    avoid: frozenset[str],
) -> tuple[str, ...]:
    candidates = _covering(swarm, start, end)
    candidates = candidates[candidates != primary]
    wanted = min(job.backups, len(candidates))
    if wanted == 0:
        return ()
    blocks = end - start
    latency = swarm.hop[candidates] + blocks * swarm.ms_per_block[candidates]
    cost = swarm.unit_cost[candidates] * blocks
    in_use = np.fromiter(
        (swarm.provider(i) in avoid for i in candidates.tolist()), dtype=np.float64, count=len(candidates)
    )
    if job.kind == "inference":
        keys = np.stack([in_use, latency, cost])
    else:
        keys = np.stack([in_use, (rest_latency + latency) * (rest_cost + cost), latency, cost])
    order = np.lexsort(keys[::-1])
    # Candidates tied with the last one taken compete by provider id, like primaries do.
    last = keys[:, order[wanted - 1]]
    through = wanted
    while through < len(order) and np.array_equal(keys[:, order[through]], last):
        through += 1
    head = sorted(order[:through].tolist(), key=lambda k: (keys[:, k].tolist(), swarm.provider(candidates[k])))
    return tuple(swarm.provider(candidates[k]) for k in head[:wanted])


# --- diagnosis -------------------------------------------------------------------------------


def _gaps(job: JobRequest, columns: _Columns, excluded: frozenset[str], start: int, end: int) -> list[Gap]:
    """Why blocks of ``[start, end)`` have no eligible offer, as runs of blocks."""
    allowed = columns.allowed(excluded)
    price_ok = columns.price <= job.max_price
    reliable = columns.reliability >= job.reliability_floor
    fast = columns.throughput >= (job.min_throughput or 0.0)
    gaps: list[Gap] = []
    for block in range(start, end):
        covers = (columns.start <= block) & (columns.end > block)
        usable = covers & allowed
        if (usable & price_ok & reliable & fast).any():
            continue
        if not covers.any():
            gap = Gap(block, block + 1, "no_offers")
        elif not usable.any():
            gap = Gap(block, block + 1, "excluded")
        elif (usable & reliable & fast).any():
            gap = Gap(block, block + 1, "price", needed_price=int(columns.price[usable & reliable & fast].min()))
        elif (usable & price_ok & fast).any():
            gap = Gap(
                block,
                block + 1,
                "reliability",
                best_reliability=float(columns.reliability[usable & price_ok & fast].max()),
            )
        elif (usable & price_ok & reliable).any():
            gap = Gap(
                block,
                block + 1,
                "throughput",
                best_throughput=float(columns.throughput[usable & price_ok & reliable].max()),
            )
        else:
            gap = Gap(block, block + 1, "limits")
        previous = gaps[-1] if gaps else None
        if previous is not None and previous.end == block and previous.reason == gap.reason:
            gaps[-1] = Gap(
                previous.start,
                block + 1,
                gap.reason,
                needed_price=_merge(max, previous.needed_price, gap.needed_price),
                best_reliability=_merge(min, previous.best_reliability, gap.best_reliability),
                best_throughput=_merge(min, previous.best_throughput, gap.best_throughput),
            )
        else:
            gaps.append(gap)
    return gaps


def _merge(pick: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    return None if a is None else pick(a, b)


def _check_budget(job: JobRequest, cost_per_million_tokens: int) -> None:
    if job.budget * 1_000_000 < cost_per_million_tokens:
        raise NoPlanError(needed_budget=-(-cost_per_million_tokens // 1_000_000))


# --- entry points ----------------------------------------------------------------------------


def match_job(job: JobRequest, offers: Sequence[Offer], *, exclude: Collection[str] = ()) -> Plan:
    """The best plan for ``job`` from ``offers`` (one per provider), never using a provider
    in ``exclude``. Raises :class:`NoPlanError` naming the blocks that cannot be covered
    and why, :class:`InvalidOfferError` for an offer outside the model or a provider
    offering twice."""
    if not isinstance(job, JobRequest):
        raise InvalidJobError(f"expected a JobRequest, got {type(job).__name__}")
    columns = _Columns(offers, job.num_blocks)
    swarm = _Swarm(job, columns, frozenset(exclude))
    chain = _solve(swarm, job.kind, 0, job.num_blocks)
    if chain is None:
        raise NoPlanError(gaps=_gaps(job, columns, swarm.excluded, 0, job.num_blocks))
    _check_budget(job, chain.cost)
    primaries = frozenset(swarm.provider(i) for _, _, i in chain.parts)
    segments = _segments(swarm, job, chain, (chain.latency, chain.cost), primaries)
    return Plan(kind=job.kind, num_blocks=job.num_blocks, segments=tuple(segments))


def replan_segment(
    plan: Plan, failed_provider_id: str, offers: Sequence[Offer], job: JobRequest
) -> tuple[Segment, ...]:
    """Replacement segments for every block ``failed_provider_id`` served as a primary in
    ``plan``, in block order, chosen from ``offers`` without it and within the job's price
    cap, reliability floor and throughput floor.

    Usually one segment per failed segment (a provider holding the same blocks); a chain of
    several when no single provider does. Runs of the failed provider's blocks are solved in
    block order, each exactly for the job's objective with the plan's other segments (and
    earlier replacements) held fixed. The failed provider is never a backup of the
    replacements. Raises :class:`NoPlanError` naming the blocks no other eligible provider
    serves, :class:`InvalidPlanError` if the provider is not a primary of the plan or the
    plan is not for this job."""
    if not isinstance(job, JobRequest) or not isinstance(plan, Plan):
        raise InvalidInputError("replan_segment takes a Plan and a JobRequest")
    if plan.num_blocks != job.num_blocks or plan.kind != job.kind:
        raise InvalidPlanError(
            f"the plan ({plan.kind}, {plan.num_blocks} blocks) is not for this job "
            f"({job.kind}, {job.num_blocks} blocks)"
        )
    failed = [segment for segment in plan.segments if segment.primary == failed_provider_id]
    if not failed:
        raise InvalidPlanError(f"provider {failed_provider_id!r} is not a primary of this plan")
    columns = _Columns(offers, job.num_blocks)
    swarm = _Swarm(job, columns, frozenset({failed_provider_id}))
    # Adjacent failed segments are replaced as one run: one provider may cover both.
    runs: list[list[int]] = []
    for segment in failed:
        if runs and runs[-1][1] == segment.start:
            runs[-1][1] = segment.end
        else:
            runs.append([segment.start, segment.end])
    kept = [segment for segment in plan.segments if segment.primary != failed_provider_id]
    latency = sum(segment.latency_ms for segment in kept)
    cost = sum(segment.price * segment.blocks for segment in kept) * job.passes
    chains: list[_Chain] = []
    gaps: list[Gap] = []
    for start, end in runs:
        chain = _solve(swarm, job.kind, start, end, rest=(latency, cost))
        if chain is None:
            gaps += _gaps(job, columns, swarm.excluded, start, end)
            continue
        chains.append(chain)
        latency, cost = latency + chain.latency, cost + chain.cost
    if gaps:
        raise NoPlanError(gaps=gaps)
    _check_budget(job, cost)
    primaries = frozenset(segment.primary for segment in kept) | {
        swarm.provider(i) for c in chains for _, _, i in c.parts
    }
    replacements: list[Segment] = []
    for chain in chains:
        replacements += _segments(swarm, job, chain, (latency, cost), primaries)
    return tuple(replacements)
