"""The demo's marketplace processes: they start from nothing on the embedded defaults,
serve, run the scheduler, and leave no process behind when stopped."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil

from hivemart.demo.stack import LocalMarket
from hivemart_core.api import Client


def test_local_market_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    market = LocalMarket(tmp_path / "home", extra_env={"DATABASE_URL": "", "REDIS_URL": ""})
    try:
        market.manage("migrate", "--no-input")
        key = market.manage("create_api_key", "ops", "--create", "--staff").strip()
        market.start_web()
        market.start_scheduler()
        health = httpx.get(f"{market.url}/healthz").json()
        assert health["checks"]["database"]["detail"] == "sqlite"
        assert health["checks"]["broker"]["detail"] == "hivemartfs"
        with Client(api_key=key, base_url=market.url) as client:
            assert client.accounts.me().is_staff
        pids = [p.process.pid for p in market.processes]
        children = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
        assert (tmp_path / "home" / "marketplace.sqlite3").exists()
    finally:
        market.stop()
    assert not [
        pid
        for pid in pids + children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
