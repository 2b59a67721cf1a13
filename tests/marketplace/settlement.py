"""Helpers for settlement tests: a fixed platform key, a planned job with tickets, signed receipts.

Everything goes through the real services (job_create, job_plan_store, which issues the
tickets) and the real protocol code (ReceiptCounter signs receipts as a provider agent does).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, WorkReceipt, countersign
from hivemart_core.protocol.tickets import JobTicket
from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.jobs.models import Job
from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store, job_transition
from marketplace.providers.models import Provider
from marketplace.receipts.models import Ticket
from tests.marketplace.factories import make_model, make_provider, make_user, make_wallet, register

PLATFORM_SEED = bytes(range(32))
# Every provider planned_job registered, by id: its identity (to sign receipts again later).
IDENTITIES: dict[int, Identity] = {}
_keys = itertools.count(1)


def platform_key_file(folder: Path) -> Path:
    """Write the tests' fixed platform key under ``folder`` and return its path."""
    path = folder / "platform.key"
    if not path.exists():
        Identity.from_seed(PLATFORM_SEED).save(path)
    return path


def platform() -> Identity:
    return Identity.from_seed(PLATFORM_SEED)


@dataclass
class PlannedJob:
    """A job planned over one segment per provider in ``providers`` (with backups), its client
    identity, and the providers' identities by provider id."""

    job: Job
    client: User
    client_identity: Identity | None
    providers: list[Provider]
    backups: list[Provider]
    identities: dict[int, Identity] = field(default_factory=dict)

    def ticket(self, provider: Provider, *, role: str | None = None) -> Ticket:
        tickets = Ticket.objects.filter(job=self.job, provider=provider).order_by("-id")
        if role:
            tickets = tickets.filter(role=role)
        return tickets.first()

    def counter(self, provider: Provider, session: str = "session-0001") -> ReceiptCounter:
        return ReceiptCounter(JobTicket.from_dict(self.ticket(provider).signed), session)

    def receipt(
        self,
        provider: Provider,
        units: int,
        *,
        counter: ReceiptCounter | None = None,
        session: str = "session-0001",
        countersigned: bool = True,
    ) -> WorkReceipt:
        """Record ``units`` more work on ``counter`` (a fresh one unless given) and sign a receipt."""
        counter = counter or self.counter(provider, session)
        counter.record(units, os.urandom(32))
        receipt = counter.receipt(self.identities[provider.pk])
        if countersigned and self.client_identity is not None:
            receipt = countersign(receipt, self.client_identity)
        return receipt


def planned_job(
    *,
    segments: int = 1,
    num_blocks: int = 4,
    budget: int = 1_000_000,
    price: int = 1_000,
    backups: int = 1,
    client_key: bool = True,
    running: bool = True,
    model: CatalogModel | None = None,
    reuse: list[Provider] | None = None,
    **job_fields: Any,
) -> PlannedJob:
    """A funded client's job over a fresh model (or ``model``), planned with one primary (and
    ``backups`` backups) per segment, each a freshly registered provider with a known identity;
    ``reuse`` names providers (with identities in ``IDENTITIES``) to plan first instead."""
    model = model or make_model(num_blocks=num_blocks)
    num_blocks = model.num_blocks
    reuse = list(reuse or [])
    client = make_wallet(user=make_user(), credits=budget * 2).user
    identity = Identity.generate() if client_key else None
    job, _ = job_create(
        user=client,
        kind="inference",
        model_id=model.model_id,
        budget=budget,
        max_price=price * 10,
        idempotency_key=f"settle-{next(_keys)}",
        client_key=identity.public_key.hex() if identity else "",
        **job_fields,
    )
    bounds = [(num_blocks * i // segments, num_blocks * (i + 1) // segments) for i in range(segments)]
    identities: dict[int, Identity] = {}

    def provider(start: int, end: int) -> Provider:
        if reuse:
            p = reuse.pop(0)
            identities[p.pk] = IDENTITIES[p.pk]
            return p
        ident = Identity.generate()
        p = register(user=make_user(), identity=ident, model=model, start=start, end=end, price=price)
        p = make_provider_online(p)
        identities[p.pk] = IDENTITIES[p.pk] = ident
        return p

    primaries, spares, specs = [], [], []
    for start, end in bounds:
        primary = provider(start, end)
        extra = [provider(start, end) for _ in range(backups)]
        primaries.append(primary)
        spares += extra
        specs.append(SegmentSpec(block_start=start, block_end=end, provider=primary, backups=extra))
    job_plan_store(job=job, segments=specs)
    if running:
        job = job_transition(job=job, to_state=Job.State.RUNNING)
    job.refresh_from_db()
    return PlannedJob(
        job=job, client=client, client_identity=identity, providers=primaries, backups=spares, identities=identities
    )


def make_provider_online(provider: Provider) -> Provider:
    from marketplace.providers.services import provider_heartbeat

    return provider_heartbeat(provider=provider, state="online", throughput=1000.0, latency_ms=20.0)


__all__ = ["PlannedJob", "planned_job", "platform", "platform_key_file", "make_provider", "PLATFORM_SEED"]
