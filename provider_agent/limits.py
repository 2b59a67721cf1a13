"""Per-peer quotas: what one peer can make the agent hold, and what all of them together can.

An agent serves strangers, so every resource a request can pin is bounded per peer and in
total: open streams (each is a file descriptor here and in the p2p daemon), bytes of
request tensors buffered while they arrive, inference sessions, and KV cache reserved by
them. A peer over a quota gets a typed error (``busy``, ``cache_full``) and the others are
served as before. Pressure is logged, at most once a minute per kind and peer, so that an
operator sees an attack (or a too-small limit) without a flood of lines.

Everything here runs on the agent's event loop thread; nothing needs a lock.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass

from hivemind.utils.logging import get_logger

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol import error_codes as codes

__all__ = ["RequestError", "PeerQuotas", "Quotas", "BufferLease", "widen_accept_backlog"]

logger = get_logger(__name__)

_LOG_EVERY_S = 60.0


class RequestError(Exception):
    """A request that is well-formed on the wire but cannot be served; carries a code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Quotas:
    """The limits :class:`PeerQuotas` enforces (from ``AgentConfig``)."""

    streams_per_peer: int
    buffer_bytes: int
    peer_buffer_bytes: int
    sessions_per_peer: int
    peer_cache_bytes: int


class BufferLease:
    """Bytes of request tensors one stream has buffered, claimed from its peer's and the
    agent's budgets as they arrive (``take``) and given back together (``release``)."""

    def __init__(self, quotas: PeerQuotas, peer: str) -> None:
        self._quotas, self._peer, self.nbytes = quotas, peer, 0

    def take(self, nbytes: int) -> None:
        self._quotas._take_buffer(self._peer, nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        self._quotas._release_buffer(self._peer, self.nbytes)
        self.nbytes = 0


class PeerQuotas:
    """Counts what each peer holds and refuses what would exceed a quota."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.streams: Counter[str] = Counter()
        self.buffered: Counter[str] = Counter()
        self.buffered_total = 0
        self.sessions: Counter[str] = Counter()
        self.cache: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], float] = {}
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Each stream costs a descriptor here and one in the p2p daemon: warn well before either runs out.
        self._streams_warning = soft // 2 if soft != resource.RLIM_INFINITY else None

    @property
    def streams_total(self) -> int:
        return sum(self.streams.values())

    def _pressure(self, kind: str, peer: str, message: str) -> None:
        now = time.monotonic()
        if now - self._logged.get((kind, peer), -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[(kind, peer)] = now
            if len(self._logged) > 10_000:  # peers come and go; keep the memory of warnings bounded
                self._logged = {key: at for key, at in self._logged.items() if now - at < _LOG_EVERY_S}
            logger.warning(message)

    # --- streams ------------------------------------------------------------------------------

    def open_stream(self, peer: str) -> bool:
        """Count a new stream of ``peer``; False (and nothing counted) when it has too many."""
        if self.streams[peer] >= self.quotas.streams_per_peer:
            self._pressure(
                "streams",
                peer,
                f"peer {peer} holds {self.streams[peer]} open streams, the most one "
                f"peer may (--max-streams-per-peer); refusing more",
            )
            return False
        self.streams[peer] += 1
        total = self.streams_total
        if self._streams_warning is not None and total >= self._streams_warning:
            self._pressure(
                "descriptors",
                "",
                f"{total} streams open, half of this process's limit of open "
                f"files; raise LimitNOFILE (ulimit -n) or lower --max-streams-per-peer",
            )
        return True

    def close_stream(self, peer: str) -> None:
        self.streams[peer] -= 1
        if self.streams[peer] <= 0:
            del self.streams[peer]

    # --- buffered request bytes -----------------------------------------------------------------

    def lease(self, peer: str) -> BufferLease:
        return BufferLease(self, peer)

    def _take_buffer(self, peer: str, nbytes: int) -> None:
        if self.buffered[peer] + nbytes > self.quotas.peer_buffer_bytes:
            self._pressure(
                "buffer",
                peer,
                f"peer {peer} has {self.buffered[peer]} bytes of requests in flight, "
                f"the most one peer may (--peer-buffer-mb); refusing more",
            )
            raise ProtocolError(
                f"this peer already has {self.buffered[peer]} bytes of requests in flight here, "
                f"the limit is {self.quotas.peer_buffer_bytes}; wait for replies before sending "
                f"more",
                code=codes.BUSY,
            )
        if self.buffered_total + nbytes > self.quotas.buffer_bytes:
            self._pressure(
                "buffer",
                "",
                f"{self.buffered_total} bytes of requests in flight from all peers, the "
                f"limit (--buffer-mb); refusing more",
            )
            raise ProtocolError(
                "this provider is receiving as much as it may buffer; retry shortly or use another provider",
                code=codes.BUSY,
            )
        self.buffered[peer] += nbytes
        self.buffered_total += nbytes

    def _release_buffer(self, peer: str, nbytes: int) -> None:
        self.buffered[peer] -= nbytes
        self.buffered_total -= nbytes
        if self.buffered[peer] <= 0:
            del self.buffered[peer]

    # --- inference sessions ---------------------------------------------------------------------

    def check_session(self, peer: str, cache_bytes: int) -> None:
        """Raise unless ``peer`` may open one more session reserving ``cache_bytes``."""
        if self.sessions[peer] >= self.quotas.sessions_per_peer:
            self._pressure(
                "sessions",
                peer,
                f"peer {peer} holds {self.sessions[peer]} sessions, the most one peer may (--max-sessions-per-peer)",
            )
            raise RequestError(
                codes.BUSY,
                f"this peer already has {self.sessions[peer]} sessions open here, the most "
                f"one peer may; close one or use another provider",
            )
        if self.cache[peer] + cache_bytes > self.quotas.peer_cache_bytes:
            self._pressure(
                "cache", peer, f"peer {peer} asked for more than its share of the KV cache (--peer-cache-mb)"
            )
            raise RequestError(
                codes.CACHE_FULL,
                f"the session needs {cache_bytes} bytes of cache; this peer already "
                f"holds {self.cache[peer]} of the {self.quotas.peer_cache_bytes} one "
                f"peer may; ask for a shorter max_length or a smaller batch",
            )

    def add_session(self, peer: str, cache_bytes: int) -> None:
        self.sessions[peer] += 1
        self.cache[peer] += cache_bytes

    def remove_session(self, peer: str, cache_bytes: int) -> None:
        self.sessions[peer] -= 1
        self.cache[peer] -= cache_bytes
        if self.sessions[peer] <= 0:
            del self.sessions[peer], self.cache[peer]


def widen_accept_backlog(path: str, backlog: int = 4096) -> int:
    """Let the listening unix socket at ``path`` queue ``backlog`` connections; returns how
    many sockets were changed (0 where /proc is missing).

    The p2p daemon connects to that socket once per incoming stream. hivemind listens with
    asyncio's default backlog of 100, so a burst of more streams than that, arriving while
    the event loop is busy, overflowed the queue: the daemon's connect failed and it reset
    the stream, and the client got a closed stream instead of its reply (about one request
    in ten thousand under load, none logged here). ``listen`` on a listening socket only
    changes its backlog (the kernel caps it at net.core.somaxconn).
    """
    try:
        fds = [int(entry) for entry in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    changed = 0
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile, or not ours to use
        try:
            if (
                sock.family == socket.AF_UNIX
                and sock.getsockname() == path
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                sock.listen(backlog)
                changed += 1
        except OSError:
            pass
        finally:
            sock.close()  # the duplicate only: the listening socket stays open
    return changed
