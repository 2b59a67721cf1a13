"""Log tails and stopping of the subprocesses a demo, benchmark or test starts."""

from __future__ import annotations

import signal
import subprocess
import sys

from client_sdk.processes import log_tail, stop_processes


def test_log_tail_gives_the_last_lines(tmp_path):
    log = tmp_path / "agent.log"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert log_tail(log, 3) == "line 7\nline 8\nline 9"


def test_log_tail_of_a_missing_log_is_empty(tmp_path):
    assert log_tail(tmp_path / "never-written.log", 5) == ""


def test_stop_processes_terminates_and_kills_what_ignores_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    stop_processes([polite, stubborn], grace=0.5)
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
