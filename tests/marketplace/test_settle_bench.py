"""``hivemart bench settle`` runs end to end and checks its books (no timing asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.marketplace.test_ledger_processes import child_database_url

REPO = Path(__file__).resolve().parents[2]
KEYS = {"database", "receipts", "receipts_per_s", "consistent"}


def run_bench(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hivemart.cli import main; main()",
            "bench",
            "settle",
            "--json",
            "--receipts",
            "90",
            "--jobs",
            "6",
            "--workers",
            "2",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_settle_bench_on_sqlite(tmp_path: Path) -> None:
    out = run_bench({"DATABASE_URL": "", "HIVEMART_HOME": str(tmp_path)})
    assert set(out) == KEYS
    assert (out["database"], out["receipts"], out["consistent"]) == ("sqlite", 90, True)
    assert out["receipts_per_s"] > 0


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_settle_bench_on_postgres(tmp_path: Path) -> None:
    out = run_bench({"DATABASE_URL": child_database_url(), "HIVEMART_HOME": str(tmp_path)})
    assert (out["database"], out["receipts"], out["consistent"]) == ("postgresql", 90, True)


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_missing_database_is_one_line_that_says_what_to_do() -> None:
    from django.db import connection

    settings = connection.settings_dict
    url = f"postgres://{settings['USER']}@{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}/no_such_db_x"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hivemart.cli import main; main()",
            "bench",
            "settle",
            "--receipts",
            "1",
            "--jobs",
            "1",
        ],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "createdb" in result.stderr and "Traceback" not in result.stderr
