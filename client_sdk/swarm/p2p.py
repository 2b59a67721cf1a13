"""Starting hivemind's p2p daemon so that it cannot outlive the process that started it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from hivemind.p2p import P2P

__all__ = ["start_p2p", "die_with_parent"]

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
