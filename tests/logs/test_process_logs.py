"""The processes' log options as an operator sets them: ``hivemart-provider --log-format`` (or
``HIVEMART_LOG_FORMAT``) and the marketplace's ``HIVEMART_LOG_FORMAT``/``HIVEMART_LOG_LEVEL``.
A provider's default output (start-up steps, no per-heartbeat lines) is checked on a real agent
in tests/swarm/test_market_link.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.cli_errors import ROOT, one_error_line, run_cli


@pytest.mark.parametrize(
    "args, env",
    [(["--log-format", "xml", "dht"], {}), (["dht"], {"HIVEMART_LOG_FORMAT": "xml"})],
    ids=["flag", "environment"],
)
def test_the_provider_refuses_an_unknown_log_format(args: list[str], env: dict[str, str]) -> None:
    code, stderr = run_cli("provider_agent", *args, env=env)
    assert code == 2
    line = one_error_line(stderr)
    assert "--log-format" in line and "'xml' is not one of 'text', 'json'" in line


def test_the_command_line_refuses_an_unknown_log_format() -> None:
    code, stderr = run_cli("hivemart", "--log-format", "yaml", "models", "--help")
    assert code == 2 and "'yaml' is not one of 'text', 'json'" in one_error_line(stderr)


def _market_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "SECRET_KEY": "test-only",
        "DATABASE_URL": "",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_market_processes_write_json_lines_when_asked(tmp_path) -> None:
    # What Django's settings set up for the web process (and Celery's worker and beat, through
    # scheduler.celery's setup_logging receiver): a record per line, a traceback inside its record.
    done = _market_python(
        """
        import logging
        import django

        django.setup()
        logging.getLogger("marketplace.jobs").info("job %d planned", 5)
        logging.getLogger("httpx").info("HTTP Request: POST /api/providers/1/heartbeat/")  # quiet below DEBUG
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("scheduler.tasks").exception("task failed")
        """,
        HIVEMART_LOG_FORMAT="json",
        HIVEMART_HOME=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in records] == [
        ("INFO", "marketplace.jobs", "job 5 planned"),
        ("ERROR", "scheduler.tasks", "task failed"),
    ]
    assert "ZeroDivisionError" in records[1]["exception"]


@pytest.mark.parametrize(
    "env, says",
    [
        ({"HIVEMART_LOG_FORMAT": "xml"}, "HIVEMART_LOG_FORMAT: unknown log format 'xml': use text or json"),
        ({"HIVEMART_LOG_LEVEL": "LOUD"}, "HIVEMART_LOG_LEVEL: unknown log level 'LOUD'"),
    ],
    ids=["format", "level"],
)
def test_the_market_refuses_an_unknown_log_format_or_level(env: dict[str, str], says: str, tmp_path) -> None:
    done = _market_python("import django; django.setup()", HIVEMART_HOME=str(tmp_path), **env)
    assert done.returncode != 0 and says in done.stderr


@pytest.mark.swarm
def test_a_bootstrap_node_logs_json_lines_only(tmp_path) -> None:
    # Its hivemind lines included: hivemind's own handler would print them in its own format.
    ready = tmp_path / "dht.ready"
    log = tmp_path / "dht.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HIVEMART_LOG_FORMAT": "json"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "provider_agent", "-vv", "dht", "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    loggers = {r["logger"] for r in records}
    assert "provider_agent.bootstrap" in loggers and any(name.startswith("hivemind") for name in loggers), loggers
