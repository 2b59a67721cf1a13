"""Disputes: a client that refuses a receipt reports it (``receipt_dispute``); staff decide
(``dispute_verdict_record``), voiding and clawing back a cheating provider's work. While a
ticket is disputed its credit window is not paid.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import public_key_from_peer_id, verify_signature
from hivemart_core.protocol.receipts import (
    ReceiptError,
    WorkReceipt,
)
from marketplace.accounts.models import User
from marketplace.common.errors import Conflict, InvalidTransition, NotFound, PermissionDenied, ValidationFailed
from marketplace.jobs.models import TERMINAL_STATES, Job
from marketplace.receipts.models import Audit, Dispute, Offence, Ticket
from marketplace.receipts.services.offences import provider_job_void, provider_offence_record
from marketplace.receipts.services.pricing import PAYABLE_STATES
from marketplace.receipts.services.settlement import tickets_pay

logger = logging.getLogger(__name__)

DISPUTE_CODES = ("receipt_units", "receipt_chain", "receipt_replay", "receipt_ticket", "receipt_missing")
# A job's open disputes at once: each stores one receipt, so this bounds what a client can store.
MAX_OPEN_DISPUTES_PER_JOB = 64


@transaction.atomic
def receipt_dispute(*, user: User, job: Job, receipt: Any, code: str, message: str = "") -> tuple[Dispute, bool]:
    """The job's client refused to countersign ``receipt`` (a provider-signed receipt of one of
    the job's tickets) because it failed check ``code``. Until staff decide the dispute
    (:func:`dispute_verdict_record`), the ticket's credit window is not paid: its provider is
    paid only for what the client countersigned. Returns (dispute, created); reporting the
    same receipt again returns the first dispute."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's client may dispute its receipts")
    if code not in DISPUTE_CODES:
        raise ValidationFailed(f"code is one of {', '.join(DISPUTE_CODES)}", extra={"field": "code"})
    if not isinstance(message, str) or len(message) > 300:
        raise ValidationFailed("message is at most 300 characters", extra={"field": "message"})
    try:
        parsed = WorkReceipt.from_dict(receipt)
    except ReceiptError as e:
        raise ValidationFailed(f"receipt: {e}", extra={"field": "receipt"}, code="bad_receipt") from None
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)  # settlement's lock: no payment races this
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=parsed.ticket_id).first()
    if ticket is None or parsed.job_id != job.pk or parsed.provider_peer != ticket.provider.peer_id:
        raise NotFound(
            f"job #{job.pk} has no ticket {parsed.ticket_id} of {parsed.provider_peer}", extra={"field": "receipt"}
        )
    try:
        key = public_key_from_peer_id(parsed.provider_peer)
    except ProtocolError:
        key = None
    if key is None or not verify_signature(key, parsed.signing_bytes(), bytes.fromhex(parsed.provider_signature)):
        raise ValidationFailed(
            "the receipt is not signed by the provider it names", extra={"field": "receipt"}, code="receipt_signature"
        )
    if parsed.client_signature:
        raise ValidationFailed(
            "this receipt carries a countersignature: send the receipt the provider signed, as you refused it",
            extra={"field": "receipt"},
            code="client_signature",
        )
    existing = Dispute.objects.filter(ticket=ticket, session_id=parsed.session_id, seq=parsed.seq).first()
    if existing is not None:
        return existing, False
    if job.state in TERMINAL_STATES:
        raise InvalidTransition(f"job #{job.pk} is {job.state}; it was settled", extra={"state": job.state})
    if Dispute.objects.filter(job=job, state=Dispute.State.OPEN).count() >= MAX_OPEN_DISPUTES_PER_JOB:
        raise Conflict(f"job #{job.pk} already has {MAX_OPEN_DISPUTES_PER_JOB} open disputes", code="too_many_disputes")
    dispute = Dispute.objects.create(
        job=job,
        ticket=ticket,
        provider=ticket.provider,
        reporter=user,
        session_id=parsed.session_id,
        seq=parsed.seq,
        units=parsed.units,
        code=code,
        message=message,
        receipt=parsed.to_dict(),
    )
    Ticket.objects.filter(pk=ticket.pk, disputed_at__isnull=True).update(disputed_at=timezone.now())
    logger.warning(
        "job #%s: the client disputes receipt %s/%s#%s of provider %s (%s)",
        job.pk,
        ticket.ticket_id,
        parsed.session_id,
        parsed.seq,
        ticket.provider_id,
        code,
    )
    return dispute, True


@transaction.atomic
def dispute_verdict_record(*, dispute_id: int, verdict: str, detail: str) -> Dispute:
    """Decide a dispute (staff, like an audit's verdict). ``provider_cheated``: the provider's
    work on the job is voided and clawed back and the offence recorded (as a failed audit);
    otherwise, once the ticket has no open dispute left, its credit window is paid again."""
    if verdict not in Audit.Verdict.values:
        raise ValidationFailed(f"verdict is one of {', '.join(Audit.Verdict.values)}", extra={"field": "verdict"})
    job_id = Dispute.objects.filter(pk=dispute_id).values_list("job_id", flat=True).first()
    if job_id is None:
        raise NotFound(f"no dispute {dispute_id}")
    job = Job.objects.select_for_update(of=("self",)).select_related("hold__escrow").get(pk=job_id)
    dispute = Dispute.objects.select_for_update().select_related("provider", "ticket").get(pk=dispute_id)
    if dispute.state == Dispute.State.DECIDED:
        return dispute
    dispute.state, dispute.verdict, dispute.detail, dispute.decided_at = (
        Dispute.State.DECIDED,
        verdict,
        detail[:500],
        timezone.now(),
    )
    dispute.save(update_fields=["state", "verdict", "detail", "decided_at"])
    if verdict == Audit.Verdict.PROVIDER_CHEATED:
        provider_job_void(job=job, provider=dispute.provider)
        if not Offence.objects.filter(provider=dispute.provider, job=job, kind=Offence.Kind.AUDIT).exists():
            provider_offence_record(
                provider=dispute.provider,
                kind=Offence.Kind.AUDIT,
                job=job,
                detail=f"dispute #{dispute.pk} of job #{job.pk}: {detail}",
            )
        return dispute
    if not Dispute.objects.filter(ticket=dispute.ticket, state=Dispute.State.OPEN).exists():
        Ticket.objects.filter(pk=dispute.ticket_id).update(disputed_at=None)
        if job.state in PAYABLE_STATES and dispute.ticket.voided_at is None:
            ticket = Ticket.objects.select_related("provider__earnings_account").get(pk=dispute.ticket_id)
            tickets_pay(job, ticket.provider_id, {ticket.pk: ticket}, units=0, key=f"dispute-{dispute.pk}", nreceipts=0)
    return dispute
