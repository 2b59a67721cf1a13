"""Factories for scheduler tests, on top of the marketplace's (real services throughout)."""

from __future__ import annotations

import itertools
from typing import Any

from marketplace.catalog.models import CatalogModel
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_create
from marketplace.providers.models import Provider
from marketplace.providers.services import provider_heartbeat, provider_measurement_record
from tests.marketplace.factories import make_model, make_provider, make_user, make_wallet

__all__ = ["make_job", "make_model", "make_provider", "measured_provider", "funded_user"]

_keys = itertools.count(1)


def funded_user(credits: int = 10_000_000) -> Any:
    return make_wallet(user=make_user(), credits=credits).user


def make_job(*, model: CatalogModel, user: Any = None, **overrides: Any) -> Job:
    fields: dict[str, Any] = dict(
        kind="inference", budget=1_000_000, max_price=5_000, idempotency_key=f"job-{next(_keys)}"
    )
    fields.update(overrides)
    job, _ = job_create(user=user or funded_user(), model_id=model.model_id, **fields)
    return job


def measured_provider(
    *,
    model: CatalogModel,
    start: int,
    end: int,
    price: int,
    throughput: float = 1000.0,
    latency_ms: float = 20.0,
    success_rate: float = 1.0,
    **overrides: Any,
) -> Provider:
    """An online provider with a probe measurement (what matching uses) of these figures."""
    provider = make_provider(model=model, start=start, end=end, price=price, **overrides)
    provider_measurement_record(
        provider=provider, throughput=throughput, latency_ms=latency_ms, success_rate=success_rate
    )
    provider.refresh_from_db()
    return provider


def heartbeat(provider: Provider, **figures: Any) -> Provider:
    return provider_heartbeat(provider=provider, state="online", **figures)
