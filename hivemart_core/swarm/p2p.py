"""Starting hivemind's p2p daemon so that it cannot outlive the process that started it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError
from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import Multiaddr

from hivemart_core.errors import SwarmError

__all__ = ["start_p2p", "die_with_parent", "daemon_alive", "stop_p2p", "check_initial_peers"]

_PEER_EXAMPLE = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."

logger = get_logger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies.

    Run in a child between fork and exec (``preexec_fn``). This is what keeps p2p daemons
    and agent subprocesses from becoming orphans when their parent is SIGKILLed, which no
    cleanup handler can catch.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() == 1:  # the parent already died before prctl took effect
            os.kill(os.getpid(), sig)


@contextlib.contextmanager
def _children_die_with_parent() -> Iterator[None]:
    # hivemind spawns p2pd itself through asyncio.subprocess.create_subprocess_exec and offers
    # no hook for preexec_fn; wrap that function for the duration of P2P.create only.
    original = asyncio.subprocess.create_subprocess_exec

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", die_with_parent)
        # Its own session: a signal to our process group (Ctrl-C, `timeout`, `kill -- -PGID`)
        # reaches us but not the daemon, which we still need to withdraw from the DHT; it
        # dies with us all the same (parent-death signal).
        kwargs.setdefault("start_new_session", True)
        return await original(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = spawn
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = original


async def start_p2p(
    *,
    initial_peers: Sequence[str] = (),
    identity_path: str | Path | None = None,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
) -> P2P:
    """Start a p2p daemon tied to this process's lifetime.

    Must be called from a thread that lives as long as the daemon should (the kernel's
    parent-death signal follows the thread that forked the child).
    """
    initial_peers = check_initial_peers(initial_peers)
    try:
        return await _create(
            initial_peers=initial_peers,
            identity_path=identity_path,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs,
            client_mode=client_mode,
        )
    except P2PDaemonError as e:
        reason = str(e).rsplit(": ", 1)[-1].strip()  # p2pd's own words, after its time stamp
        if initial_peers and "bootstrap" in reason:
            raise SwarmError(
                f"none of the initial peers answered ({' '.join(initial_peers)}): is the bootstrap "
                f"node running, and are its address and port reachable from here?"
            ) from e
        raise SwarmError(f"the p2p daemon did not start: {reason}") from e


def check_initial_peers(peers: Sequence[str]) -> list[str]:
    """``peers`` (entries may hold several, space-separated) as a list, each checked to be a
    multiaddr that ends with the peer's id; ValueError says which one is wrong and why."""
    checked = []
    for peer in (p for entry in peers for p in str(entry).split()):
        try:
            protocols = [p.name for p in Multiaddr(peer).protocols()]
        except ValueError as e:
            raise ValueError(f"{peer!r} is not a multiaddr like {_PEER_EXAMPLE} ({e})") from None
        if not protocols or protocols[-1] != "p2p":
            raise ValueError(
                f"{peer!r} does not end with the peer's id: use the full address the bootstrap node "
                f"printed, like {_PEER_EXAMPLE}"
            )
        checked.append(peer)
    return checked


async def _create(
    *,
    initial_peers: Sequence[str],
    identity_path: str | Path | None,
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    client_mode: bool,
) -> P2P:
    with _children_die_with_parent():
        return await P2P.create(
            initial_peers=list(initial_peers) or None,
            identity_path=str(identity_path) if identity_path else None,
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            # Identity files hold Ed25519 keys, which hivemind's collision check cannot parse.
            check_if_identity_free=False,
            dht_mode="client" if client_mode else "server",
            # The agent decides itself when it is idle; the daemon must not exit on its own.
            idle_timeout=3600 * 24 * 365,
        )


def daemon_alive(p2p: P2P) -> bool:
    """Whether ``p2p``'s daemon process still runs (a daemon we did not start counts as alive).

    Every hivemind call through a dead daemon waits forever on its control socket, so shutdown
    paths check this first.
    """
    child = getattr(p2p, "_child", None)  # hivemind keeps the daemon's process here, privately
    return child is None or child.returncode is None


async def stop_p2p(p2p: P2P, *closers: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> None:
    """Run ``closers`` (a DHT node's ``shutdown``, say) and then stop the daemon, each bounded
    by ``timeout`` seconds, so that a process asked to exit always does.

    Closers talk to the daemon: each is abandoned as soon as the daemon is found dead (a
    signal to the whole process group or cgroup reaches it too), since hivemind would then
    wait on its control socket forever.
    """
    for close in closers:
        if not daemon_alive(p2p):
            logger.info("the p2p daemon is gone; skipping the rest of the orderly shutdown")
            break
        await _unless_daemon_dies(p2p, close(), timeout, getattr(close, "__qualname__", repr(close)))
    try:
        await asyncio.wait_for(p2p.shutdown(), timeout)
    except Exception as e:
        logger.warning(f"the p2p daemon did not stop in {timeout} s: {e!r}")


async def _unless_daemon_dies(p2p: P2P, work: Awaitable[Any], timeout: float, what: str) -> None:
    task = asyncio.ensure_future(work)
    child = getattr(p2p, "_child", None)
    waiters = {task} if child is None else {task, asyncio.ensure_future(child.wait())}
    done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if task not in done:
        logger.warning(f"{what} did not finish: " + ("the p2p daemon died" if done else f"{timeout} s passed"))
    elif task.exception() is not None:  # shutting down: report, never stop halfway
        logger.warning(f"{what} failed: {task.exception()!r}")
