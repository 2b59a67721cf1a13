"""Where a joining provider is needed most: Petals' rule, pure Python.

The swarm's capacity at a block is the summed throughput (tokens/s through one block) of
the providers serving it; a chain is as fast as its weakest block. A provider with room for
``n`` blocks should therefore serve the window of ``n`` consecutive blocks whose *sorted*
capacities are lexicographically smallest: first the window containing the weakest block,
among those the one whose second-weakest block is weakest, and so on. Ties go to the
earliest window. (``scheduler.placement``, where present, is the fuller treatment; this is
the minimal rule the ``placement_suggest`` task needs.)
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["block_capacity", "weakest_span"]


def block_capacity(num_blocks: int, spans: Sequence[tuple[int, int, float]]) -> list[float]:
    """Summed throughput per block from ``(start, end, throughput)`` spans; spans outside
    ``0..num_blocks`` are clipped to it."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    capacity = [0.0] * num_blocks
    for start, end, throughput in spans:
        if throughput < 0:
            raise ValueError(f"throughput must be non-negative, got {throughput}")
        for block in range(max(0, start), min(num_blocks, end)):
            capacity[block] += throughput
    return capacity


def weakest_span(capacity: Sequence[float], length: int) -> tuple[int, int]:
    """The half-open window of ``length`` blocks (at most all of them) to serve."""
    if not capacity:
        raise ValueError("a model has at least one block")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    length = min(length, len(capacity))
    best = min(range(len(capacity) - length + 1), key=lambda s: (sorted(capacity[s:s + length]), s))
    return best, best + length
