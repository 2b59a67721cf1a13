"""The subprocesses a demo, benchmark or test starts: their logs, and stopping them so that none is left behind."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["log_tail", "stop_processes"]


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a process's log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_processes(processes: Sequence[subprocess.Popen[Any]], *, grace: float = 15.0) -> None:
    """SIGTERM every process still running, in the order given, and SIGKILL those still
    running ``grace`` seconds later (the whole group shares one deadline)."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
