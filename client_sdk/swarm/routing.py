"""Choosing a chain of providers that covers a model's blocks.

Inference wants the minimum expected per-token latency: each hop costs a fixed overhead
(network and (de)serialisation) plus ``blocks / throughput`` of compute. The best chain is
a shortest path over block boundaries, where an edge ``b -> e`` through server ``s`` exists
when ``s`` serves every block in ``[b, e)`` (a server may be asked for part of its span).

Throughputs are what providers say about themselves, so a claim alone must not capture
routing: a peer that has not yet served this client counts with at most the median claim
among the candidates (one loud record cannot raise it), and only peers that served it (and
did not fail since; see :class:`~client_sdk.swarm.bans.PeerBans`) count with their own
figure. A peer that lies and then fails is banned by the session that tried it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from hivemind.utils.logging import get_logger

from hivemart_core.errors import NoProvidersError
from hivemart_core.protocol.records import ServerRecord
from hivemart_core.protocol.rpc import PROTOCOL_VERSION, SUPPORTED_VERSIONS, version_mismatch

__all__ = ["RouteHop", "find_route", "trusted_throughputs", "DEFAULT_HOP_COST_S"]

# Measured on loopback: one hop of a pushed inference step costs about a millisecond of
# messaging beside the compute. Real networks cost more; callers may pass their estimate.
DEFAULT_HOP_COST_S = 0.002

logger = get_logger(__name__)

_PAID_ONLY_HINT = (
    "their providers serve paid jobs only (they require a job ticket); run this as a marketplace "
    "job (`hivemart generate --paid ...`, or attach a MarketJob to the model)"
)


@dataclass(frozen=True)
class RouteHop:
    """Blocks ``[start, end)`` served by ``peer_id``."""

    peer_id: str
    start: int
    end: int
    record: ServerRecord


def trusted_throughputs(servers: Sequence[ServerRecord], verified: AbstractSet[str]) -> dict[str, float]:
    """Throughput to route by, per peer: its claim if it is in ``verified``, else its claim
    capped at the (lower) median claim of ``servers``."""
    claims = sorted(r.throughput for r in servers)
    cap = claims[(len(claims) - 1) // 2] if claims else 0.0
    return {r.peer_id: r.throughput if r.peer_id in verified else min(r.throughput, cap) for r in servers}


def find_route(
    records: Iterable[ServerRecord],
    model_id: str,
    start: int,
    end: int,
    *,
    hop_cost_s: float = DEFAULT_HOP_COST_S,
    avoid: AbstractSet[str] = frozenset(),
    verified: AbstractSet[str] = frozenset(),
    free: bool = False,
) -> list[RouteHop]:
    """The minimum-latency chain over blocks ``[start, end)``; NoProvidersError names the
    first blocks that no usable server covers.

    ``verified``: peers whose throughput claims count in full (they served this client).
    ``free``: the client has no job tickets, so providers that require one are skipped.
    """
    overlapping = [r for r in records if r.peer_id not in avoid and r.end > start and r.start < end]
    candidates = _speaking_our_version(overlapping)
    servers = [r for r in candidates if not (free and r.requires_ticket)]
    throughputs = trusted_throughputs(servers, verified)
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
            throughput = throughputs[server.peer_id]
            per_block = 1.0 / throughput if throughput > 0 else 1.0
            for stop in range(boundary + 1, min(server.end, end) + 1):
                candidate = cost + hop_cost_s + (stop - boundary) * per_block
                if candidate < best.get(stop, float("inf")):
                    best[stop] = candidate
                    came_from[stop] = (boundary, server)
                    heapq.heappush(frontier, (candidate, stop))
    if end not in best:
        reached = max(best)
        uncovered_to = min((r.start for r in servers if r.start > reached), default=end)
        paid_only = any(r.start <= reached < r.end for r in candidates if r.requires_ticket)
        other_version = next(
            (r.protocol_version for r in overlapping if r.start <= reached < r.end and r not in candidates), None
        )
        hint = _PAID_ONLY_HINT if free and paid_only else None
        if hint is None and other_version is not None:
            hint = f"their providers speak protocol v{other_version}, this client v{PROTOCOL_VERSION}"
        raise NoProvidersError(model_id, reached, uncovered_to, hint=hint)
    hops: list[RouteHop] = []
    boundary = end
    while boundary != start:
        previous, server = came_from[boundary]
        hops.append(RouteHop(server.peer_id, previous, boundary, server))
        boundary = previous
    return hops[::-1]


def _speaking_our_version(records: list[ServerRecord]) -> list[ServerRecord]:
    """The records of providers that speak a protocol version this client speaks; the others
    are skipped (an older provider refuses our RPC names, a newer one may refuse ours)."""
    usable = []
    for record in records:
        if record.protocol_version in SUPPORTED_VERSIONS:
            usable.append(record)
        else:
            logger.info(f"not routing to {record.peer_id}: {version_mismatch(record.protocol_version)}")
    return usable
