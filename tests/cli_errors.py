"""Running a console script as a user would, for tests of its error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """``python -m MODULE ARGS`` with this checkout importable; its exit code and stderr."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stderr


def one_error_line(stderr: str) -> str:
    """The single ``Error: ...`` line of a CLI's output; fails on a traceback or several errors."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    return errors[0]
