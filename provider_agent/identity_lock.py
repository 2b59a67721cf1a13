"""One running process per identity: a lock file beside the key, held while the process runs.

Two agents started on one machine without ``--identity`` would otherwise both load the
default key: the second takes the first's peer id, its records overwrite the first's, and
clients find no provider for the first span. The lock is an ``flock`` on ``KEY.lock``,
released by the kernel when the process exits however it exits, so a crash never leaves a
stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

__all__ = ["IdentityInUseError", "hold_identity"]


class IdentityInUseError(RuntimeError):
    """Another running process holds this identity."""


def hold_identity(key_path: Path) -> IO[str]:
    """Lock the identity at ``key_path`` for this process; close the returned file to release
    it. IdentityInUseError says what to do when another process holds it."""
    lock_path = key_path.with_name(key_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "a+")  # not inherited by the p2p daemon: Python's files are close-on-exec
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise IdentityInUseError(
            f"identity {key_path} is in use by another running agent{by}; to run another agent on this machine, "
            f"give it its own key file with --identity PATH"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
