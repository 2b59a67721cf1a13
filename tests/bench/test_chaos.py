"""``hivemart bench chaos``, short: paid jobs through five providers while providers are
SIGKILLed, SIGSTOPped and restarted and the Celery worker is restarted.

Runs on the embedded defaults (SQLite, the embedded broker) so that no shared service is
restarted; Redis and PostgreSQL restarts are the long benchmark's (and are reported skipped
here, with the reason). Asserts the chaos run's promises, never its timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client_sdk.demo.chaos import RUN_ENV, find_tagged_processes, local_service

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KEYS = {"jobs", "jobs_exact", "jobs_settled", "faults", "ledger_consistent", "credits_lost", "orphans"}
PROVIDER_AND_WORKER_FAULTS = {"provider_sigkill", "provider_sigstop", "provider_restart", "worker_restart"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("chaos")
    env = {**os.environ, "DATABASE_URL": "", "REDIS_URL": "", "HIVEMART_HOME": str(home), "TMPDIR": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "client_sdk", "bench", "chaos", "--json", "--minutes", "0.2", "--providers", "5",
         "--fault-interval", "2", "--new-tokens", "8", "--lora-steps", "3", "--data-dir", str(home / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    lines = result.stdout.strip().splitlines()
    assert lines, f"no report (exit {result.returncode}):\n{result.stderr[-6000:]}"
    out = json.loads(lines[-1])
    out["_stderr"] = result.stderr[-6000:]
    out["_returncode"] = result.returncode
    return out


def test_chaos_report_has_the_promised_keys_and_every_provider_and_worker_fault(report: dict) -> None:
    assert KEYS <= set(report), report["_stderr"]
    assert report["jobs"] >= 2 and report["jobs_by_kind"]["inference"] >= 1 and report["jobs_by_kind"]["finetune"] >= 1
    assert set(report["fault_kinds"]) == PROVIDER_AND_WORKER_FAULTS
    assert all(report["faults_by_kind"][kind] >= 1 for kind in PROVIDER_AND_WORKER_FAULTS), report["faults_by_kind"]
    assert report["faults"] == sum(report["faults_by_kind"].values()) >= 4
    # the embedded defaults: no service of this machine was restarted, and the report says why
    assert set(report["fault_kinds_skipped"]) == {"redis_restart", "postgres_restart"}


def test_chaos_books_balance_and_nothing_is_left_behind(report: dict) -> None:
    assert report["ledger_consistent"] is True
    assert report["credits_lost"] == 0, report
    assert report["client_spent"] == report["providers_earned"] + report["fees"] > 0
    assert report["orphans"] == 0, report.get("orphan_pids")
    assert report["jobs_settled"] == report["jobs"], report["failures"]
    assert report["reference_settled"] is True


def test_chaos_every_job_is_exact_or_failed_with_a_reason(report: dict) -> None:
    assert report["jobs_inexact"] == 0, report["failures"]
    assert report["jobs_exact"] + report["jobs_failed"] == report["jobs"]
    for failure in report["failures"]:
        assert failure["reason"] and failure["final_state"] in ("cancelled", "failed", "done"), failure


# --- the pieces, alone ---------------------------------------------------------------------------


def test_only_servers_on_this_machine_are_restarted() -> None:
    assert local_service("redis://127.0.0.1:6390/8", ("redis",)) == ("127.0.0.1", 6390)
    assert local_service("redis://localhost/0", ("redis",)) == ("localhost", 6379)
    assert local_service("postgres://postgres@127.0.0.1/hm", ("postgres",)) == ("127.0.0.1", 5432)
    for url in ("", "redis://10.0.0.5:6379/0", "redis://redis.example.com/0", "sqlite:///x.db",
                "postgres://db.internal:5432/hm"):
        assert local_service(url, ("redis", "postgres")) is None, url


def test_tagged_processes_are_found_until_they_exit() -> None:
    run_id = "test-" + os.urandom(4).hex()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, RUN_ENV: run_id})
    try:
        assert find_tagged_processes(run_id) == [child.pid]
        assert find_tagged_processes(run_id + "x") == []
    finally:
        child.kill()
        child.wait()
    assert find_tagged_processes(run_id) == []
