"""Offences and voiding: what a proven cheat costs a provider (reputation, suspension, and
its work on the job clawed back). Shared by audits, disputes and the scheduler's probes.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from marketplace.common.errors import NotFound
from marketplace.jobs.models import Job
from marketplace.ledger.models import Account, Posting
from marketplace.ledger.services import (
    clawback,
)
from marketplace.providers.models import Provider
from marketplace.providers.services import provider_reputation_lower, provider_suspend
from marketplace.receipts.models import Audit, Offence, Settlement, Ticket

logger = logging.getLogger(__name__)


def provider_offence_record(
    *, provider: Provider, kind: str, detail: str, job: Job | None = None, audit: Audit | None = None
) -> Offence:
    """Record an offence: the provider's reputation falls by ``HIVEMART_REPUTATION_PENALTY``
    and, at ``HIVEMART_SUSPEND_AFTER`` offences, it is suspended (out of matching and placement)."""
    with transaction.atomic():
        offence = Offence.objects.create(provider=provider, kind=kind, job=job, audit=audit, detail=detail[:200])
        provider_reputation_lower(provider=provider, by=settings.HIVEMART_REPUTATION_PENALTY)
        count = Offence.objects.filter(provider=provider).count()
        if count >= settings.HIVEMART_SUSPEND_AFTER:
            provider_suspend(provider=provider, reason=f"{count} offences; the last: {detail}"[:200])
    logger.warning("provider %s offence (%s): %s", provider.pk, kind, detail)
    return offence


@transaction.atomic
def provider_job_void(*, job: Job, provider: Provider) -> int:
    """Void the provider's tickets for ``job``: their receipts are never settled, and what was
    already paid for them is clawed back from its earnings (as far as their balance allows,
    with the platform's fee on it) to the job's hold, or to the client's wallet once the hold
    is closed. Returns the micro-credits taken from the provider; voiding twice takes nothing."""
    tickets = Ticket.objects.select_for_update().filter(job=job, provider=provider, voided_at__isnull=True)
    if not Ticket.objects.filter(job=job, provider=provider).exists():
        raise NotFound(f"provider {provider.pk} holds no ticket of job #{job.pk}")
    if Ticket.objects.filter(job=job, provider=provider, voided_at__isnull=False).exists():
        tickets.update(voided_at=timezone.now())
        return 0
    tickets.update(voided_at=timezone.now())
    paid = Settlement.objects.filter(job=job, provider=provider, transaction__isnull=False).values("transaction_id")
    legs = Posting.objects.filter(transaction_id__in=paid)
    net = sum(legs.filter(account_id=provider.earnings_account_id).values_list("amount", flat=True))
    fee = sum(legs.filter(account__kind=Account.Kind.FEES).values_list("amount", flat=True))
    if net <= 0:
        return 0
    job = Job.objects.select_related("hold").get(pk=job.pk)
    _, taken = clawback(
        source=provider.earnings_account,
        hold=job.hold,
        amount=net,
        fee_refund=fee,
        idempotency_key=f"clawback:job:{job.pk}:provider:{provider.pk}",
        memo=f"job #{job.pk}: work voided by an audit",
    )
    return taken
