"""Choosing a chain of providers that covers a model's blocks.

Inference wants the minimum expected per-token latency: each hop costs a fixed overhead
(network and (de)serialisation) plus ``blocks / throughput`` of compute. The best chain is
a shortest path over block boundaries, where an edge ``b -> e`` through server ``s`` exists
when ``s`` serves every block in ``[b, e)`` (a server may be asked for part of its span).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable

from client_sdk.errors import NoProvidersError
from client_sdk.protocol.records import ServerRecord

__all__ = ["RouteHop", "find_route", "DEFAULT_HOP_COST_S"]

# Measured on loopback: one hop of a pushed inference step costs about a millisecond of
# messaging beside the compute. Real networks cost more; callers may pass their estimate.
DEFAULT_HOP_COST_S = 0.002


@dataclass(frozen=True)
class RouteHop:
    """Blocks ``[start, end)`` served by ``peer_id``."""

    peer_id: str
    start: int
    end: int
    record: ServerRecord


def find_route(records: Iterable[ServerRecord], model_id: str, start: int, end: int, *,
               hop_cost_s: float = DEFAULT_HOP_COST_S, avoid: frozenset[str] | set[str] = frozenset()) -> list[RouteHop]:
    """The minimum-latency chain over blocks ``[start, end)``; NoProvidersError names the
    first blocks that no usable server covers."""
    servers = [r for r in records if r.peer_id not in avoid and r.end > start and r.start < end]
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, ServerRecord]] = {}
    frontier = [(0.0, start)]
    while frontier:
        cost, boundary = heapq.heappop(frontier)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for server in servers:
            if not server.start <= boundary < server.end:
                continue
            per_block = 1.0 / server.throughput if server.throughput > 0 else 1.0
            for stop in range(boundary + 1, min(server.end, end) + 1):
                candidate = cost + hop_cost_s + (stop - boundary) * per_block
                if candidate < best.get(stop, float("inf")):
                    best[stop] = candidate
                    came_from[stop] = (boundary, server)
                    heapq.heappush(frontier, (candidate, stop))
    if end not in best:
        reached = max(best)
        uncovered_to = min((r.start for r in servers if r.start > reached), default=end)
        raise NoProvidersError(model_id, reached, uncovered_to)
    hops: list[RouteHop] = []
    boundary = end
    while boundary != start:
        previous, server = came_from[boundary]
        hops.append(RouteHop(server.peer_id, previous, boundary, server))
        boundary = previous
    return hops[::-1]
