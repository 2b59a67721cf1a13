"""``hivemart-market beat`` starts on a fresh data directory with Redis as the broker, where
nothing else has created the folder its schedule file lives in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler.app.management.commands.beat import _schedule_file


def test_schedule_file_option_forms() -> None:
    assert _schedule_file(["--schedule", "/a/b"]) == "/a/b"
    assert _schedule_file(["-s", "x"]) == "x"
    assert _schedule_file(["--schedule=/c"]) == "/c"
    assert _schedule_file(["--loglevel", "INFO"]) is None
    assert _schedule_file(["--schedule"]) is None


@pytest.mark.redis
def test_beat_starts_on_a_fresh_home_with_redis(tmp_path: Path) -> None:
    home = tmp_path / "fresh-home"
    env = {
        **os.environ,
        "HIVEMART_HOME": str(home),
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "SECRET_KEY": "test-only",
        "DATABASE_URL": "",
    }
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "marketplace.manage", "beat"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        schedule = home / "celery"
        deadline = time.monotonic() + 60
        while not any(schedule.glob("beat-schedule*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, log.read_text()[-3000:]
        assert any(schedule.glob("beat-schedule*")), log.read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
