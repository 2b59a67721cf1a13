"""``hivemart bench settle``: upload and settle work receipts on the configured database.

Sets up ``jobs`` running jobs, each planned on one of a few providers (so each has a signed
ticket), and signs ``receipts`` receipts spread evenly over them, one (ticket, session) each,
every one signed by its provider and countersigned by the client, as the SDK would upload
them. Signing is the providers' and clients' work and happens before the clock starts.

Timed: ``workers`` processes, each with its own database session (as web workers and Celery
workers have), upload their share of the receipts in batches of 500 through
``receipts_upload`` (the service behind ``POST /api/receipts/``: signature checks against the
stored tickets, the newest-receipt rules, the upsert); once all are in, each settles its
jobs with ``receipts_settle`` (one capture per job and provider), as the settlement tasks
queued by those uploads would. Afterwards the bench checks the books: every receipt settled, every escrow and
earnings balance equal to what the receipts cost, and the ledger verifies.

The database is whatever ``DATABASE_URL`` names (the SQLite file by default); it is migrated
first. Rows are created under a fresh name per run, so runs can repeat.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD

__all__ = ["run_settle_bench"]

_PROVIDERS = 4
_PRICE = 1_000  # micro-credits per million work units
_BUDGET = 10_000_000  # per job: far more than its receipts cost, so nothing falls short
_BATCH = MAX_RECEIPTS_PER_UPLOAD  # the marketplace's limit per upload


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(32))
    # No broker messages from the bench: settlement is called here, matching is not wanted.
    os.environ["HIVEMART_MATCH_ON_CREATE"] = "false"
    os.environ["HIVEMART_SETTLE_ON_UPLOAD"] = "false"
    import django

    django.setup()


def _units(i: int) -> int:
    """The i-th receipt's units: varied, deterministic."""
    return 5_000 + (i * 7919) % 20_000


def _worker(batches: list[list[dict[str, Any]]], user_id: int, job_ids: list[int], barrier: Any, results: Any) -> None:
    _setup_django()
    from django.db import connection

    from marketplace.accounts.models import User
    from marketplace.receipts.services.settlement import receipts_settle
    from marketplace.receipts.services.uploads import receipts_upload

    user = User.objects.get(pk=user_id)
    connection.ensure_connection()
    barrier.wait()
    started = time.perf_counter()
    accepted = 0
    for batch in batches:
        accepted += sum(o.status == "accepted" for o in receipts_upload(user=user, receipts=batch))
    uploaded = time.perf_counter()
    barrier.wait()  # settlement starts once every receipt is in
    settle_started = time.perf_counter()
    summary = receipts_settle(job_ids=job_ids, close=False)
    finished = time.perf_counter()
    connection.close()
    results.put(
        {
            "accepted": accepted,
            "settled": summary.receipts,
            "captured": summary.captured,
            "started": started,
            "uploaded": uploaded,
            "settle_started": settle_started,
            "finished": finished,
        }
    )


def run_settle_bench(
    *, receipts: int = 20_000, jobs: int = 200, workers: int = 2, progress: Callable[[str], None] = lambda message: None
) -> dict:
    """Run the bench; returns ``{"database", "receipts", "receipts_per_s", "consistent"}``
    (the per-second figure covers upload and settlement; each phase's time goes to ``progress``)."""
    if receipts < 1 or jobs < 1 or workers < 1:
        raise ValueError("receipts, jobs and workers must be positive")
    _setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections
    from django.db.models import F

    from hivemart_core.protocol.identity import Identity
    from hivemart_core.protocol.receipts import ReceiptCounter, countersign
    from hivemart_core.protocol.tickets import JobTicket
    from marketplace.accounts.services import user_create
    from marketplace.catalog.services import catalog_model_create
    from marketplace.jobs.models import Job
    from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store, job_transition
    from marketplace.ledger.models import Account
    from marketplace.ledger.selectors import ledger_verify
    from marketplace.ledger.services import credit_grant, fee_for, wallet_get_or_create
    from marketplace.providers.services import OfferSpec, challenge_issue, provider_register, registration_message
    from marketplace.receipts.models import Receipt, Ticket
    from marketplace.receipts.services.pricing import ticket_cost

    progress(f"migrating the {connection.vendor} database")
    call_command("migrate", verbosity=0, interactive=False)

    run = uuid.uuid4().hex[:10]
    progress(f"setting up {jobs} jobs on {_PROVIDERS} providers")
    model = catalog_model_create(
        model_id=f"bench-{run}",
        arch="llama",
        num_blocks=4,
        hidden_size=64,
        dtype="float32",
        weights_digest=uuid.uuid4().hex * 2,
        block_digests=[uuid.uuid4().hex * 2 for _ in range(4)],
    )
    client = user_create(username=f"bench-{run}")
    credit_grant(account=wallet_get_or_create(user=client), amount=_BUDGET * jobs, memo=f"bench {run}")
    operator = user_create(username=f"bench-{run}-provider")
    providers, identities = [], {}
    for _ in range(_PROVIDERS):
        identity = Identity.generate()
        nonce = challenge_issue(user=operator).nonce
        provider, _ = provider_register(
            user=operator,
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            challenge=nonce,
            signature=identity.sign(registration_message(nonce)),
            offer=OfferSpec(model=model, block_start=0, block_end=4, price=_PRICE),
        )
        providers.append(provider)
        identities[provider.pk] = identity
    client_keys, job_rows = {}, []
    for j in range(jobs):
        key = Identity.generate()
        job, _ = job_create(
            user=client,
            kind="inference",
            model_id=model.model_id,
            budget=_BUDGET,
            max_price=_PRICE,
            idempotency_key=f"bench-{run}-{j}",
            client_key=key.public_key.hex(),
        )
        job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=4, provider=providers[j % _PROVIDERS])])
        job_rows.append(job_transition(job=job, to_state=Job.State.RUNNING))
        client_keys[job.pk] = key

    progress(f"signing {receipts} receipts")
    tickets = {t.job_id: t for t in Ticket.objects.filter(job__in=job_rows)}
    shares: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for i in range(receipts):
        j = i % jobs
        ticket = tickets[job_rows[j].pk]
        counter = ReceiptCounter(JobTicket.from_dict(ticket.signed), f"bench-{run}-{i:08d}")
        counter.record(_units(i), i.to_bytes(32, "big"))
        receipt = countersign(counter.receipt(identities[ticket.provider_id]), client_keys[ticket.job_id])
        shares[j % workers].append(receipt.to_dict())  # a job's receipts all go through one worker

    progress(f"{workers} worker processes upload {receipts} receipts in batches of {_BATCH}, then settle")
    connections.close_all()  # children open their own sessions
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = []
    for w in range(workers):
        batches = [shares[w][k : k + _BATCH] for k in range(0, len(shares[w]), _BATCH)]
        job_ids = [job.pk for j, job in enumerate(job_rows) if j % workers == w]
        procs.append(ctx.Process(target=_worker, args=(batches, client.pk, job_ids, barrier, queue), daemon=True))
    for p in procs:
        p.start()
    outcomes = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    started = min(o["started"] for o in outcomes)
    uploaded = max(o["uploaded"] for o in outcomes)
    finished = max(o["finished"] for o in outcomes)
    accepted = sum(o["accepted"] for o in outcomes)
    settled = sum(o["settled"] for o in outcomes)
    captured = sum(o["captured"] for o in outcomes)

    progress("checking the books")
    fee_bps = settings.HIVEMART_PLATFORM_FEE_BPS
    units_per_job: dict[int, int] = {}
    for i in range(receipts):
        units_per_job[job_rows[i % jobs].pk] = units_per_job.get(job_rows[i % jobs].pk, 0) + _units(i)
    cost = {pk: ticket_cost(u, max_units=tickets[pk].max_units, price=_PRICE) for pk, u in units_per_job.items()}
    escrows = dict(Account.objects.filter(hold__job__in=job_rows).values_list("hold__job", "balance"))
    earned: dict[int, int] = {p.pk: 0 for p in providers}
    for job in job_rows:
        earned[tickets[job.pk].provider_id] += cost.get(job.pk, 0) - fee_for(cost.get(job.pk, 0), fee_bps)
    earnings = {p.pk: Account.objects.get(pk=p.earnings_account_id).balance for p in providers}
    unsettled = Receipt.objects.filter(ticket__job__in=job_rows).exclude(settled_units=F("units")).count()
    consistent = (
        accepted == receipts
        and settled == receipts
        and unsettled == 0
        and captured == sum(cost.values())
        and all(escrows[job.pk] == _BUDGET - cost.get(job.pk, 0) for job in job_rows)
        and earnings == earned
        and ledger_verify(accounts=Account.objects.filter(user__in=[client, operator])).consistent
    )
    elapsed = finished - started
    progress(f"upload {uploaded - started:.2f}s, settlement {finished - uploaded:.2f}s ({workers} worker processes)")
    return {
        "database": connection.vendor,
        "receipts": receipts,
        "receipts_per_s": round(receipts / elapsed, 1) if elapsed > 0 else None,
        "consistent": consistent,
    }
