"""Celery tasks: thin wrappers that take ids, call a service in ``scheduler.services`` (one module per task family), and
return a small JSON-able summary.

Every task is idempotent (the services re-read rows under a lock and act only from the
expected state), so ``acks_late`` is safe. Retries are bounded, with exponential backoff,
and only for errors known to be transient: the database going away or a lock timeout
(``OperationalError``), and a plan that raced a provider's offer change (``MatchRaced``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction

from marketplace.common.idempotency import idempotency_records_purge as purge_idempotency_records
from scheduler.celery import app
from scheduler.services import audits, housekeeping, placement, planning, probes, settlement

logger = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError)
_RETRY = dict(acks_late=True, max_retries=5, retry_backoff=2, retry_backoff_max=120, retry_jitter=True)


@app.task(name="scheduler.job_match", autoretry_for=(*TRANSIENT, planning.MatchRaced), **_RETRY)
def job_match(job_id: int) -> dict[str, Any]:
    """Plan a pending job (pending -> planned), or fail it with the reason no plan exists."""
    return planning.job_match(job_id=job_id).to_dict()


@app.task(name="scheduler.jobs_match_pending", autoretry_for=TRANSIENT, **_RETRY)
def jobs_match_pending() -> list[int]:
    """Re-queue job_match for pending jobs whose first message never ran (a sweep)."""
    return planning.jobs_match_pending(older_than_s=settings.HIVEMART_HOUSEKEEPING_INTERVAL_S, enqueue=job_match.delay)


@app.task(name="scheduler.providers_expire", autoretry_for=TRANSIENT, **_RETRY)
def providers_expire() -> int:
    """Mark providers whose heartbeats stopped offline."""
    return housekeeping.providers_expire()


@app.task(name="scheduler.holds_expire", autoretry_for=TRANSIENT, **_RETRY)
def holds_expire() -> list[int]:
    """Fail jobs idle past their deadline, releasing their holds."""
    return housekeeping.holds_expire()


@app.task(name="scheduler.idempotency_records_purge", autoretry_for=TRANSIENT, **_RETRY)
def idempotency_records_purge() -> int:
    """Forget the API's Idempotency-Keys older than their retention period."""
    return purge_idempotency_records()


# A probe round holds a swarm connection for a while; no point in queueing a second one behind it.
@app.task(name="scheduler.providers_probe", autoretry_for=TRANSIENT, expires=600, **_RETRY)
def providers_probe() -> dict[str, Any]:
    """Benchmark every online provider through the swarm and record what was measured."""
    return probes.providers_probe()


@app.task(name="scheduler.placement_suggest", autoretry_for=TRANSIENT, **_RETRY)
def placement_suggest(model_id: str, num_blocks: int) -> dict[str, int]:
    """The span a joining provider of ``model_id`` with room for ``num_blocks`` blocks should serve."""
    from marketplace.catalog.selectors import catalog_model_for_use

    start, end = placement.placement_suggest(model=catalog_model_for_use(model_id=model_id), num_blocks=num_blocks)
    return {"start": start, "end": end}


@app.task(name="scheduler.receipts_settle", autoretry_for=TRANSIENT, **_RETRY)
def receipts_settle(job_ids: list[int] | None = None) -> dict[str, Any]:
    """Settle uploaded receipts (of ``job_ids``, or of every job) into the ledger and close
    finished settling jobs. Safe to run concurrently: each (job, provider) settles once."""
    if job_ids is not None and not (isinstance(job_ids, list) and all(type(j) is int for j in job_ids)):
        raise ValueError("job_ids is a list of integers")
    return settlement.receipts_settle(job_ids=job_ids)


# The validator may load a model and run it on CPU: minutes for a big one.
@app.task(name="scheduler.audit_decide", autoretry_for=TRANSIENT, **_RETRY)
def audit_decide(audit_id: int) -> dict[str, Any]:
    """Recompute an audit's disputed span with the platform validator and record the verdict."""
    return audits.audit_decide(audit_id=audit_id)


@app.task(name="scheduler.audits_decide_open", autoretry_for=TRANSIENT, **_RETRY)
def audits_decide_open() -> list[int]:
    """Re-queue audit_decide for audits still open after one housekeeping interval (a sweep)."""
    ids = audits.audits_open(older_than_s=settings.HIVEMART_HOUSEKEEPING_INTERVAL_S)
    for audit_id in ids:
        audit_decide.delay(audit_id)
    return ids


# --- queueing from the marketplace's hooks (scheduler.app registers these) ------------------


def job_match_enqueue(job_id: int) -> None:
    """Queue ``job_match`` for ``job_id`` once the current transaction commits.

    Registered with the jobs app's hook (by ``scheduler.app``) so every created job is
    matched. ``robust``: a broker outage must not fail the request that created the job;
    the ``jobs_match_pending`` sweep picks such jobs up.
    """
    transaction.on_commit(partial(job_match.delay, job_id), robust=True)


def receipts_settle_enqueue(job_ids: Sequence[int]) -> None:
    """Queue settlement of ``job_ids`` once the current transaction commits."""
    ids = sorted(set(job_ids))
    transaction.on_commit(lambda: receipts_settle.delay(ids))


def audit_decide_enqueue(audit_id: int) -> None:
    """Queue ``audit_decide`` once the current transaction commits."""
    transaction.on_commit(lambda: audit_decide.delay(audit_id))
