"""Stopping the subprocesses a demo, benchmark or test started, so that none is left behind."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Sequence

__all__ = ["stop_processes"]


def stop_processes(processes: Sequence[subprocess.Popen], *, grace: float = 15.0) -> None:
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
