"""``hivemart bench ledger``: concurrent hold captures against the configured database.

Several worker processes, each with its own database session, capture from a few shared
holds at once, the way settlement workers would, so that captures contend for the same
hold rows and for the platform's fee account. Afterwards the bench checks the books: every
escrow, earnings and fee balance must equal what the captures add up to, and the ledger
must verify (balanced transactions, balance columns equal to their postings).

The database is whatever ``DATABASE_URL`` names (the SQLite file by default); it is
migrated first. Rows are created under a fresh name per run, so runs can repeat.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["run_ledger_bench"]

_HOLDS_PER_WORKER = 1
_PAYEES = 8


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    # The bench signs nothing; a throwaway key lets it run without production secrets.
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(32))
    import django

    django.setup()


def _amount(i: int) -> int:
    """The i-th capture's amount: varied, deterministic, so the expected sums are known."""
    return 1 + (i * 7919) % 1000


@dataclass(frozen=True)
class _Plan:
    run: str
    captures: int
    workers: int
    hold_ids: list[int]
    payee_ids: list[int]

    def assignments(self, worker: int) -> list[tuple[int, int, int]]:
        """(capture index, hold id, payee id) for one worker. Consecutive captures of a worker
        rotate over all holds, so every hold is captured from by several workers at once."""
        out = []
        for j, i in enumerate(range(worker, self.captures, self.workers)):
            out.append((i, self.hold_ids[(worker + j) % len(self.hold_ids)], self.payee_ids[i % len(self.payee_ids)]))
        return out


def _worker(plan: _Plan, worker: int, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    _setup_django()
    from django.db import connection

    from marketplace.ledger.models import Account, Hold
    from marketplace.ledger.services import hold_capture

    work = plan.assignments(worker)
    holds = {h.pk: h for h in Hold.objects.filter(pk__in=plan.hold_ids)}
    payees = {a.pk: a for a in Account.objects.filter(pk__in=plan.payee_ids)}
    errors = 0
    connection.ensure_connection()
    barrier.wait()
    started = time.perf_counter()
    for i, hold_id, payee_id in work:
        try:
            hold_capture(
                hold=holds[hold_id], amount=_amount(i), payee=payees[payee_id], idempotency_key=f"bench:{plan.run}:{i}"
            )
        except Exception:  # noqa: BLE001 - counted; any error makes the run inconsistent
            errors += 1
    finished = time.perf_counter()
    connection.close()
    results.put((worker, len(work), errors, started, finished))


def run_ledger_bench(
    *, captures: int = 10_000, workers: int = 4, progress: Callable[[str], None] = lambda message: None
) -> dict:
    """Run the bench; returns ``{"database", "captures", "workers", "captures_per_s", "consistent"}``."""
    if captures < 1 or workers < 1:
        raise ValueError("captures and workers must be positive")
    _setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections

    from marketplace.accounts.services import user_create
    from marketplace.ledger.models import Account
    from marketplace.ledger.selectors import ledger_verify
    from marketplace.ledger.services import (
        credit_grant,
        earnings_account_create,
        fee_for,
        hold_place,
        platform_account,
        wallet_get_or_create,
    )

    progress(f"migrating the {connection.vendor} database")
    call_command("migrate", verbosity=0, interactive=False)

    run = uuid.uuid4().hex[:10]
    n_holds = max(1, workers * _HOLDS_PER_WORKER)
    plan_holds: dict[int, int] = {}  # hold index -> total to capture from it
    for w in range(workers):
        for j, i in enumerate(range(w, captures, workers)):
            h = (w + j) % n_holds
            plan_holds[h] = plan_holds.get(h, 0) + _amount(i)

    progress(f"setting up {n_holds} holds and {_PAYEES} payees")
    client = user_create(username=f"bench-{run}")
    wallet = wallet_get_or_create(user=client)
    # Each hold gets exactly what its captures add up to, plus a margin that must stay put.
    margin = 1_000
    credit_grant(account=wallet, amount=sum(plan_holds.values()) + margin * n_holds, memo=f"bench {run}")
    holds = [
        hold_place(account=wallet, amount=plan_holds.get(h, 0) + margin, memo=f"bench {run}") for h in range(n_holds)
    ]
    provider = user_create(username=f"bench-{run}-provider")
    payees = [earnings_account_create(user=provider, label=f"bench {run} payee {p}") for p in range(_PAYEES)]
    fees_account = platform_account(Account.Kind.FEES)
    fees_before = Account.objects.get(pk=fees_account.pk).balance
    plan = _Plan(
        run=run, captures=captures, workers=workers, hold_ids=[h.pk for h in holds], payee_ids=[p.pk for p in payees]
    )

    connections.close_all()  # children open their own sessions
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(plan, w, barrier, queue), daemon=True) for w in range(workers)]
    progress(f"{captures} captures on {workers} worker processes")
    for p in procs:
        p.start()
    outcomes = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    done = sum(o[1] for o in outcomes)
    errors = sum(o[2] for o in outcomes)
    elapsed = max(o[4] for o in outcomes) - min(o[3] for o in outcomes)

    progress("checking the books")
    fee_bps = settings.HIVEMART_PLATFORM_FEE_BPS
    expected_payee = {p.pk: 0 for p in payees}
    expected_fees = 0
    for w in range(workers):
        for i, _, payee_id in plan.assignments(w):
            fee = fee_for(_amount(i), fee_bps)
            expected_payee[payee_id] += _amount(i) - fee
            expected_fees += fee
    balances = dict(
        Account.objects.filter(pk__in=[h.escrow_id for h in holds] + list(expected_payee)).values_list("pk", "balance")
    )
    fees_gained = Account.objects.get(pk=fees_account.pk).balance - fees_before
    bench_accounts = Account.objects.filter(user__in=[client, provider])
    consistent = (
        errors == 0
        and done == captures
        and all(balances[h.escrow_id] == margin for h in holds)
        and all(balances[pk] == value for pk, value in expected_payee.items())
        # Other writers may use the same database; with none, fees grew by exactly ours.
        and fees_gained >= expected_fees
        and ledger_verify(accounts=bench_accounts).consistent
    )
    return {
        "database": connection.vendor,
        "captures": captures,
        "workers": workers,
        "captures_per_s": round(captures / elapsed, 1) if elapsed > 0 else None,
        "consistent": consistent,
    }
