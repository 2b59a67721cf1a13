"""Which blocks a provider should serve: raise the swarm's weakest block first.

This is Petals' placement rule. The throughput of block ``b`` is the sum of the
throughputs (tokens/s through one block, as in :mod:`scheduler.matching`) of every span
covering it. A provider of ``n`` blocks joins at ``start = argmin_i sorted(T[i:i+n])``:
the window whose weakest block is the weakest, then whose second weakest is, and so on.
A block nobody serves has throughput 0, so holes are filled first, most holes first.

Pure Python: the scheduler's ``placement_suggest`` task and provider agents joining
without ``--blocks`` call these with the spans they know of.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "Span",
    "InvalidSpanError",
    "block_throughputs",
    "best_span",
    "choose_span",
    "should_move",
    "DEFAULT_MIN_IMPROVEMENT",
]

Span = tuple[int, int, float]  # (start, end, throughput): blocks [start, end) at throughput tokens/s per block

# Petals moves a server only when the swarm's weakest block would get 1 / 0.75 times faster:
# moving drops every session on the server and reloads weights, so small gains do not pay.
DEFAULT_MIN_IMPROVEMENT = 1 / 0.75


class InvalidSpanError(ValueError):
    """A span or a placement argument is malformed."""


def _check_blocks(num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise InvalidSpanError(f"num_blocks must be a positive integer, got {num_blocks!r}")


def _check_range(num_blocks: int, start: object, end: object, what: str) -> None:
    if (
        isinstance(start, bool)
        or isinstance(end, bool)
        or not isinstance(start, int)
        or not isinstance(end, int)
        or not 0 <= start < end <= num_blocks
    ):
        raise InvalidSpanError(
            f"{what} [{start!r}, {end!r}) must be a non-empty range of blocks within 0..{num_blocks}"
        )


def _check_throughput(throughput: object, what: str) -> float:
    if (
        isinstance(throughput, bool)
        or not isinstance(throughput, (int, float))
        or not math.isfinite(throughput)
        or throughput < 0
    ):
        raise InvalidSpanError(f"{what}: throughput must be a finite non-negative number, got {throughput!r}")
    return float(throughput)


def block_throughputs(num_blocks: int, spans: Sequence[Span]) -> list[float]:
    """Per-block throughput: for each block, the sum of the throughputs of the spans
    covering it. A block no span with positive throughput covers is exactly 0.0."""
    _check_blocks(num_blocks)
    # Differences then a running sum: O(spans + blocks) rather than O(spans * span length).
    delta = [0.0] * (num_blocks + 1)
    servers = [0] * (num_blocks + 1)
    for span in spans:
        if not isinstance(span, (tuple, list)) or len(span) != 3:
            raise InvalidSpanError(f"a span is (start, end, throughput), got {span!r}")
        start, end, throughput = span
        _check_range(num_blocks, start, end, "span")
        value = _check_throughput(throughput, f"span [{start}, {end})")
        if value > 0:
            delta[start] += value
            delta[end] -= value
            servers[start] += 1
            servers[end] -= 1
    totals: list[float] = []
    running, covering = 0.0, 0
    for block in range(num_blocks):
        running += delta[block]
        covering += servers[block]
        # Without a server the sum is 0, not the rounding left over from adding and subtracting.
        totals.append(running if covering else 0.0)
        if not covering:
            running = 0.0
    return totals


def _best_start(throughputs: Sequence[float], length: int) -> int:
    """``argmin_i sorted(throughputs[i:i+length])``; the lowest start wins a tie."""
    return min(range(len(throughputs) - length + 1), key=lambda i: sorted(throughputs[i : i + length]))


def choose_span(num_blocks: int, num_to_serve: int, spans: Sequence[Span]) -> tuple[int, int]:
    """The blocks ``[start, end)`` a provider able to serve ``num_to_serve`` blocks should
    take, given the ``spans`` already served. A provider that can hold more blocks than
    the model has serves all of them."""
    return best_span(block_throughputs(num_blocks, spans), num_to_serve)


def best_span(throughputs: Sequence[float], num_to_serve: int) -> tuple[int, int]:
    """:func:`choose_span` from the per-block throughputs (:func:`block_throughputs`)
    rather than the spans: for a caller that keeps the sums up to date as providers come
    and go (the swarm simulation), in O(blocks) rather than O(spans)."""
    if isinstance(num_to_serve, bool) or not isinstance(num_to_serve, int) or num_to_serve < 1:
        raise InvalidSpanError(f"num_to_serve must be a positive integer, got {num_to_serve!r}")
    _check_blocks(len(throughputs))
    length = min(num_to_serve, len(throughputs))
    start = _best_start(throughputs, length)
    return start, start + length


def _with(throughputs: Sequence[float], span: tuple[int, int], throughput: float) -> list[float]:
    start, end = span
    return [t + throughput if start <= block < end else t for block, t in enumerate(throughputs)]


def should_move(
    num_blocks: int,
    my_span: tuple[int, int],
    my_throughput: float,
    other_spans: Sequence[Span],
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
) -> tuple[bool, tuple[int, int]]:
    """Whether a provider serving ``my_span`` at ``my_throughput`` should move, and where.

    It takes itself out of the swarm, chooses a span of the same length as a joining
    provider would (:func:`choose_span`), and moves only if that raises the swarm's
    minimum block throughput by more than the factor ``min_improvement`` (>= 1). While
    some blocks have no server the minimum is 0 either way, so there a move must leave
    fewer such blocks. Returns ``(False, my_span)`` when staying."""
    _check_blocks(num_blocks)
    if not isinstance(my_span, (tuple, list)) or len(my_span) != 2:
        raise InvalidSpanError(f"my_span is (start, end), got {my_span!r}")
    start, end = my_span
    _check_range(num_blocks, start, end, "my_span")
    mine = _check_throughput(my_throughput, "my_span")
    if (
        isinstance(min_improvement, bool)
        or not isinstance(min_improvement, (int, float))
        or not math.isfinite(min_improvement)
        or min_improvement < 1
    ):
        raise InvalidSpanError(f"min_improvement must be a factor >= 1, got {min_improvement!r}")
    current = (start, end)
    others = block_throughputs(num_blocks, other_spans)
    new_start = _best_start(others, end - start)
    candidate = (new_start, new_start + end - start)
    if candidate == current or mine == 0:
        return False, current
    before = _with(others, current, mine)
    after = _with(others, candidate, mine)
    weakest_before, weakest_after = min(before), min(after)
    if weakest_before == 0:
        better = weakest_after > 0 or after.count(0.0) < before.count(0.0)
    else:
        better = weakest_after > weakest_before * min_improvement
    return (True, candidate) if better else (False, current)
