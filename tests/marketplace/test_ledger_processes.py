"""Separate OS processes, each with its own PostgreSQL session, capturing from one hold at
once (as settlement workers on several machines would). The hold is never overspent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection

from marketplace.ledger.models import Account
from marketplace.ledger.selectors import hold_left, ledger_verify
from marketplace.ledger.services import hold_place
from tests.marketplace.factories import make_earnings, make_wallet

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
REPO = Path(__file__).resolve().parents[2]


def child_database_url() -> str:
    """The test database, for processes that are not pytest (they would otherwise use the real one)."""
    s = connection.settings_dict
    password = f":{quote(s['PASSWORD'])}" if s.get("PASSWORD") else ""
    return f"postgres://{quote(s['USER'])}{password}@{s['HOST'] or 'localhost'}:{s['PORT'] or 5432}/{s['NAME']}"


def test_worker_processes_capturing_from_one_hold_never_overspend_it() -> None:
    hold = hold_place(account=make_wallet(credits=10_000), amount=10_000)
    payee = make_earnings()
    env = {**os.environ, "DATABASE_URL": child_database_url(), "DJANGO_SETTINGS_MODULE": "marketplace.settings_test"}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.marketplace.capture_worker",
                str(hold.pk),
                str(payee.pk),
                "250",
                "20",
                f"w{w}",
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready", w.stderr.read()
        for w in workers:  # 4 x 20 x 250 = 20,000 asked of a 10,000 hold
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [json.loads(w.communicate(timeout=120)[0].strip().splitlines()[-1]) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()

    assert all(r["other"] == [] for r in results), results
    assert sum(r["ok"] for r in results) == 40 and sum(r["refused"] for r in results) == 40
    assert hold_left(hold=hold) == 0
    assert Account.objects.get(pk=payee.pk).balance == 40 * (250 - 250 * 100 // 10_000)
    assert ledger_verify().consistent
