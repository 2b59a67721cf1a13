"""Peers that failed recently, avoided with exponential backoff; and peers that served us."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["PeerBans"]


@dataclass
class PeerBans:
    """A peer that fails is avoided for ``base_s`` seconds, doubling with each further
    failure up to ``max_s``; a success forgives it.

    Peers that answered successfully since their last failure are :meth:`served`: routing
    believes their throughput claims (see :mod:`client_sdk.swarm.routing`).
    """

    base_s: float = 15.0
    max_s: float = 600.0
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)
    _served: set[str] = field(default_factory=set)

    def failed(self, peer_id: str, now: float | None = None) -> float:
        """Record a failure; returns how long the peer is now avoided."""
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        self._served.discard(peer_id)
        duration: float = min(self.max_s, self.base_s * 2 ** (count - 1))
        self._until[peer_id] = (time.monotonic() if now is None else now) + duration
        return duration

    def succeeded(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)
        self._served.add(peer_id)

    def served(self) -> frozenset[str]:
        """Peers that did work for us and have not failed since."""
        return frozenset(self._served)

    def banned(self, now: float | None = None) -> frozenset[str]:
        now = time.monotonic() if now is None else now
        return frozenset(peer for peer, until in self._until.items() if until > now)
