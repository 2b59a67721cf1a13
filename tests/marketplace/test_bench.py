"""``hivemart bench ledger`` runs end to end and checks its books (no timing asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.marketplace.test_ledger_processes import child_database_url

REPO = Path(__file__).resolve().parents[2]
KEYS = {"database", "captures", "workers", "captures_per_s", "consistent"}


def run_bench(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hivemart.cli import main; main()",
            "bench",
            "ledger",
            "--json",
            "--captures",
            "120",
            "--workers",
            "3",
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
def test_ledger_bench_on_sqlite(tmp_path: Path) -> None:
    out = run_bench({"DATABASE_URL": "", "HIVEMART_HOME": str(tmp_path)})
    assert set(out) == KEYS
    assert (out["database"], out["captures"], out["workers"], out["consistent"]) == ("sqlite", 120, 3, True)
    assert out["captures_per_s"] > 0


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_ledger_bench_on_postgres() -> None:
    out = run_bench({"DATABASE_URL": child_database_url()})
    assert (out["database"], out["captures"], out["consistent"]) == ("postgresql", 120, True)
