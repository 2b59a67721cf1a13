"""One ``hivemart demo --keep`` for the tests of this package: started as README.md tells a
user to (in a fresh directory, so its data lands in ``.hivemart/demo``), on the embedded
defaults (SQLite, the filesystem broker), and stopped with Ctrl-C at the end, which must stop
every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest


@dataclass
class KeptDemo:
    cwd: Path  # where it was started
    home: Path  # its data directory, cwd/.hivemart/demo
    summary: dict[str, Any]
    process: subprocess.Popen
    stderr: Path

    def market_env(self) -> dict[str, str]:
        """The environment `hivemart-market` needs to work on this demo's marketplace (what the
        demo gives its own processes)."""
        return {
            **os.environ,
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "HIVEMART_HOME": str(self.home),
            "SECRET_KEY": (self.home / "secret_key").read_text().strip(),
            "HIVEMART_MODELS_DIR": str(self.home / "models"),
            "HIVEMART_HTTPS": "false",
        }


def processes_using(path: Path) -> list[psutil.Process]:
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


@pytest.fixture(scope="package")
def kept_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeptDemo]:
    cwd = tmp_path_factory.mktemp("demo-user")
    home = cwd / ".hivemart" / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("HIVEMART_HOME", "HIVEMART_CONFIG")}
    env.update(DATABASE_URL="", REDIS_URL="")
    stderr = cwd / "demo.err"
    process = subprocess.Popen(
        [sys.executable, "-m", "hivemart", "demo", "--json", "--keep", "--new-tokens", "24", "--finetune-steps", "12"],
        stdout=subprocess.PIPE,
        stderr=open(stderr, "wb"),  # noqa: SIM115 - the child holds it
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the summary, printed before --keep waits
        assert line, stderr.read_text()[-4000:]
        yield KeptDemo(cwd=cwd, home=home, summary=json.loads(line), process=process, stderr=stderr)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 130
    deadline = time.monotonic() + 15
    while processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in processes_using(home) if p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
