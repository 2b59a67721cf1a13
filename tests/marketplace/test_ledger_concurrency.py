"""Concurrent writers on real PostgreSQL: several threads, each with its own database
session, capture from one hold (or place holds on one wallet) at the same moment. Row locks
and the CHECK constraints must keep every hold and wallet from being overspent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from marketplace.common.errors import InsufficientCredits
from marketplace.ledger.models import Account, Hold
from marketplace.ledger.selectors import hold_captured, hold_left, ledger_verify
from marketplace.ledger.services import hold_capture, hold_place, hold_release
from tests.marketplace.factories import make_earnings, make_wallet

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

WORKERS = 8


def run_concurrently(fn: Callable[[int], object], calls: int) -> list[object]:
    """Run ``fn(i)`` for i in range(calls) on WORKERS threads released together; returns the
    results, with exceptions in place of results that failed."""
    barrier = threading.Barrier(WORKERS)

    def worker(w: int) -> list[object]:
        out: list[object] = []
        try:
            barrier.wait()
            for i in range(w, calls, WORKERS):
                try:
                    out.append(fn(i))
                except Exception as e:  # noqa: BLE001 - collected and asserted on by the test
                    out.append(e)
        finally:
            connection.close()  # each thread has its own connection; the test database must be droppable
        return out

    with ThreadPoolExecutor(WORKERS) as pool:
        return [r for rs in pool.map(worker, range(WORKERS)) for r in rs]


def test_concurrent_captures_never_overspend_a_hold() -> None:
    hold = hold_place(account=make_wallet(credits=10_000), amount=10_000)
    payees = [make_earnings() for _ in range(3)]
    # 64 captures of 250 ask for 16,000 from a hold of 10,000: exactly 40 can succeed.
    results = run_concurrently(
        lambda i: hold_capture(hold=hold, amount=250, payee=payees[i % 3], idempotency_key=f"c{i}", fee_bps=300),
        calls=64,
    )

    failures = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(f, InsufficientCredits) for f in failures), failures
    assert len(results) - len(failures) == 40
    assert hold_left(hold=hold) == 0
    assert hold_captured(hold=hold) == 10_000
    assert sum(Account.objects.get(pk=p.pk).balance for p in payees) == 10_000 - 40 * (250 * 300 // 10_000)
    assert ledger_verify().consistent


def test_concurrent_retries_of_one_capture_move_credits_once() -> None:
    hold = hold_place(account=make_wallet(credits=1_000), amount=1_000)
    payee = make_earnings()
    results = run_concurrently(
        lambda i: hold_capture(hold=hold, amount=100, payee=payee, idempotency_key="same-receipt", fee_bps=0),
        calls=16,
    )
    assert not [r for r in results if isinstance(r, Exception)]
    assert len({r.pk for r in results}) == 1
    assert Account.objects.get(pk=payee.pk).balance == 100
    assert hold_left(hold=hold) == 900


def test_captures_racing_a_release_never_overspend() -> None:
    wallet = make_wallet(credits=5_000)
    hold = hold_place(account=wallet, amount=5_000)
    payee = make_earnings()

    def op(i: int) -> object:
        if i == 7:
            return hold_release(hold=hold)
        return hold_capture(hold=hold, amount=100, payee=payee, idempotency_key=f"c{i}", fee_bps=0)

    run_concurrently(op, calls=40)
    captured = Account.objects.get(pk=payee.pk).balance
    assert Hold.objects.get(pk=hold.pk).state == Hold.State.CLOSED
    assert hold_left(hold=hold) == 0
    assert Account.objects.get(pk=wallet.pk).balance == 5_000 - captured
    assert ledger_verify().consistent


def test_concurrent_holds_never_overdraw_a_wallet() -> None:
    wallet = make_wallet(credits=1_000)
    results = run_concurrently(lambda i: hold_place(account=wallet, amount=300), calls=24)
    placed = [r for r in results if isinstance(r, Hold)]
    assert len(placed) == 3
    assert all(isinstance(r, InsufficientCredits) for r in results if not isinstance(r, Hold))
    assert Account.objects.get(pk=wallet.pk).balance == 100
    assert ledger_verify().consistent


def test_concurrent_job_creation_with_one_key_makes_one_job_and_one_hold() -> None:
    from marketplace.jobs.models import Job
    from marketplace.jobs.services import job_create
    from tests.marketplace.factories import make_model

    wallet = make_wallet(credits=10_000)
    model = make_model()
    results = run_concurrently(
        lambda i: job_create(
            user=wallet.user,
            kind="inference",
            model_id=model.model_id,
            budget=3_000,
            max_price=1,
            idempotency_key="one-job",
        ),
        calls=16,
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({job.pk for job, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert Job.objects.count() == 1 and Hold.objects.count() == 1
    assert Account.objects.get(pk=wallet.pk).balance == 7_000
