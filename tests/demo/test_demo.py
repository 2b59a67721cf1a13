"""``hivemart demo`` from an empty data directory on the embedded defaults (SQLite, the
filesystem broker), as a user runs it: its JSON summary, the web site while ``--keep``
holds it open, and Ctrl-C stopping every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

SUMMARY_KEYS = {
    "tokens",
    "tokens_per_s",
    "failover_ok",
    "finetune_loss_drop",
    "receipts",
    "client_spent",
    "providers_earned",
    "fees",
    "ledger_balanced",
}


def _processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = (
                " ".join(process.info["cmdline"] or []) + " " + (process.info["environ"] or {}).get("HIVEMART_HOME", "")
            )
        except (psutil.Error, TypeError):
            continue
        if str(path) in text and process.pid != os.getpid():
            found.append(process)
    return found


def test_demo_runs_end_to_end_keeps_running_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    env = {**os.environ, "DATABASE_URL": "", "REDIS_URL": "", "HIVEMART_HOME": str(home)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hivemart",
            "demo",
            "--json",
            "--keep",
            "--new-tokens",
            "24",
            "--finetune-steps",
            "12",
            "--data-dir",
            str(home),
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "demo.err", "wb"),
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        line = process.stdout.readline()  # the summary, printed before --keep waits
        assert line, (tmp_path / "demo.err").read_text()[-4000:]
        summary = json.loads(line)
        assert SUMMARY_KEYS <= set(summary)
        assert summary["tokens"] == 24 and summary["tokens_per_s"] > 0
        assert summary["failover_ok"] is True and summary["exact_match"] is True
        assert summary["ledger_balanced"] is True
        assert summary["gateway_tokens"] > 0  # one chat completion through `hivemart serve --market`, paid
        assert summary["receipts"] > 0
        assert summary["client_spent"] > 0
        assert summary["client_spent"] == summary["providers_earned"] + summary["fees"]
        assert summary["fees"] == summary["client_spent"] - summary["providers_earned"] >= 0
        assert summary["finetune_loss_drop"] > 0

        page = httpx.get(summary["web"] + "/", timeout=10)
        assert page.status_code == 200 and "Hivemart" in page.text
        started = _processes_using(home)
        assert len(started) >= 6  # web, worker, beat, dht, three agents (and their p2p daemons)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 130
    deadline = time.monotonic() + 15
    while _processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in _processes_using(home) if p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
