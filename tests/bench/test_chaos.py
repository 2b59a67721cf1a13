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

from hivemart.demo.chaos import RUN_ENV, find_tagged_processes, local_service

# The whole run (set-up, reference, faults, settlement) happens in the first test that asks for the
# report: 2-3 minutes on an idle 2-core machine, over 13 minutes on one loaded twentyfold.
pytestmark = [pytest.mark.swarm, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
KEYS = {"jobs", "jobs_exact", "jobs_settled", "faults", "ledger_consistent", "credits_lost", "orphans"}
PROVIDER_AND_WORKER_FAULTS = {"provider_sigkill", "provider_sigstop", "provider_restart", "worker_restart"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("chaos")
    env = {**os.environ, "DATABASE_URL": "", "REDIS_URL": "", "HIVEMART_HOME": str(home), "TMPDIR": str(home)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hivemart",
            "bench",
            "chaos",
            "--json",
            "--minutes",
            "0.2",
            "--providers",
            "5",
            "--fault-interval",
            "2",
            "--new-tokens",
            "8",
            "--lora-steps",
            "3",
            "--data-dir",
            str(home / "run"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
        stdin=subprocess.DEVNULL,
    )
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


# The run keeps a live provider for every block at all times, so no job should fail, and no
# process should exit unless a fault asked it to. Both held not on main when this was written:


def test_chaos_no_job_fails_while_its_blocks_have_a_live_provider(report: dict) -> None:
    assert report["jobs_failed"] == 0 and report["jobs_not_created"] == [], report["failures"]


def test_chaos_no_process_exits_unasked(report: dict) -> None:
    assert report["unplanned_exits"] == [], report["unplanned_exits"]


# --- the pieces, alone ---------------------------------------------------------------------------


def test_only_servers_on_this_machine_are_restarted() -> None:
    assert local_service("redis://127.0.0.1:6390/8", ("redis",)) == ("127.0.0.1", 6390)
    assert local_service("redis://localhost/0", ("redis",)) == ("localhost", 6379)
    assert local_service("postgres://postgres@127.0.0.1/hm", ("postgres",)) == ("127.0.0.1", 5432)
    for url in (
        "",
        "redis://10.0.0.5:6379/0",
        "redis://redis.example.com/0",
        "sqlite:///x.db",
        "postgres://db.internal:5432/hm",
    ):
        assert local_service(url, ("redis", "postgres")) is None, url


def test_tagged_processes_are_found_until_they_exit() -> None:
    run_id = "test-" + os.urandom(4).hex()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, RUN_ENV: run_id})
    try:
        assert find_tagged_processes(run_id) == [child.pid]
        assert find_tagged_processes(run_id + "x") == []
    finally:
        child.kill()
        child.wait()
    assert find_tagged_processes(run_id) == []


# --- Redis restarts (opt-in: a second full run) ------------------------------------------------------


@pytest.mark.redis
@pytest.mark.skipif(
    os.environ.get("HIVEMART_CHAOS_SERVICES") != "1",
    reason="a second chaos run that restarts Redis; set HIVEMART_CHAOS_SERVICES=1 to run it",
)
def test_chaos_restarts_a_local_redis_and_loses_nothing(tmp_path: Path) -> None:
    """With REDIS_URL on this machine the run restarts Redis too. The Redis here is the test's
    own, on a free port, so that no other user of the machine's Redis is disturbed."""
    import shutil

    from hivemart.demo.stack import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    port = free_port()
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        capture_output=True,
    )
    try:
        env = {
            **os.environ,
            "DATABASE_URL": "",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "HIVEMART_HOME": str(tmp_path),
            "TMPDIR": str(tmp_path),
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "hivemart",
                "bench",
                "chaos",
                "--json",
                "--minutes",
                "0",
                "--providers",
                "5",
                "--fault-interval",
                "2",
                "--new-tokens",
                "8",
                "--lora-steps",
                "3",
                "--data-dir",
                str(tmp_path / "run"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1700,
            stdin=subprocess.DEVNULL,
        )
        out = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        # The run restarted it as a daemon of its own: shut down whichever runs on the port.
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
    assert out["faults_by_kind"]["redis_restart"] >= 1, result.stderr[-4000:]
    assert "postgres_restart" in out["fault_kinds_skipped"]
    assert out["ledger_consistent"] is True and out["credits_lost"] == 0 and out["orphans"] == 0
    assert out["jobs_settled"] == out["jobs"] and out["jobs_inexact"] == 0, out["failures"]
