"""Separate OS processes, each with its own PostgreSQL session, settling the same receipts at
once (as several Celery workers would): every receipt is paid exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db.models import F

from marketplace.ledger.models import Transaction
from marketplace.ledger.selectors import ledger_verify
from marketplace.receipts.models import Receipt, Settlement
from marketplace.receipts.services import receipts_upload
from tests.marketplace.settlement import planned_job, platform_key_file
from tests.marketplace.test_ledger_processes import child_database_url

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
REPO = Path(__file__).resolve().parents[2]


def test_worker_processes_settling_the_same_receipts_pay_once(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = key = platform_key_file(tmp_path)
    jobs = [planned_job(segments=2, budget=1_000_000, price=1_000) for _ in range(6)]
    for pj in jobs:
        receipts = [
            pj.receipt(p, 1_000_000 * (i + 1), session=f"session-{s:04d}")
            for i, p in enumerate(pj.providers)
            for s in range(5)
        ]
        assert all(
            o.status == "accepted" for o in receipts_upload(user=pj.client, receipts=[r.to_dict() for r in receipts])
        )
    # per job: provider 0 has 5 x 1M units (5,000), provider 1 has 5 x 2M (10,000)
    expected = 6 * (5_000 + 10_000)
    env = {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "DJANGO_SETTINGS_MODULE": "marketplace.settings_test",
        "HIVEMART_PLATFORM_KEY_FILE": str(key),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.marketplace.settle_worker", "3"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready", w.stderr.read()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [json.loads(w.communicate(timeout=180)[0].strip().splitlines()[-1]) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()

    assert all(r["errors"] == [] for r in results), results
    assert sum(r["captured"] for r in results) == expected
    assert sum(r["groups"] for r in results) == 12  # each (job, provider) settled by exactly one worker
    assert Settlement.objects.count() == 12
    assert sum(Settlement.objects.values_list("amount", flat=True)) == expected
    assert Transaction.objects.filter(kind="capture").count() == 12
    assert not Receipt.objects.exclude(settled_units=F("units")).exists()
    assert ledger_verify().consistent


def test_concurrent_uploads_keep_the_newest_receipt(settings: Any, tmp_path: Path) -> None:
    """Client and provider upload overlapping receipts of the same sessions at once, from
    threads with their own database sessions: the stored receipt is always the newest."""
    import threading

    from django.db import connection

    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    pj = planned_job()
    p = pj.providers[0]
    sessions = [pj.counter(p, f"session-{s:04d}") for s in range(4)]
    receipts = [[pj.receipt(p, 100, counter=c) for _ in range(30)] for c in sessions]
    ordered = [r.to_dict() for step in zip(*receipts, strict=False) for r in step]
    errors: list[BaseException] = []

    def upload(user: Any, batch: list[dict]) -> None:
        try:
            for k in range(0, len(batch), 7):
                receipts_upload(user=user, receipts=batch[k : k + 7])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=upload, args=(pj.client, ordered)),
        threading.Thread(target=upload, args=(p.user, ordered[::-1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    stored = sorted(Receipt.objects.values_list("session_id", "seq", "units"))
    assert stored == [(f"session-{s:04d}", 30, 3_000) for s in range(4)]
