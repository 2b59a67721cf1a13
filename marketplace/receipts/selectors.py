"""Reads for tickets, receipts, settlements and audits."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.jobs.models import Job
from marketplace.receipts.models import Audit, Dispute, Offence, Receipt, Settlement, Ticket


def job_tickets_current(*, job: Job) -> list[Ticket]:
    """The newest ticket per (segment, role, rank) of the job's current plan, in plan order."""
    plan = job.plans.order_by("-version").first()
    if plan is None:
        return []
    newest: dict[tuple[int, str, int], Ticket] = {}
    for ticket in plan.tickets.select_related("provider").order_by("id"):
        newest[(ticket.segment, ticket.role, ticket.rank)] = ticket
    return sorted(newest.values(), key=lambda t: (t.segment, t.role != Ticket.Role.PRIMARY, t.rank))


def receipts_visible_to(*, user: User) -> QuerySet[Receipt]:
    """Receipts of the user's jobs and of the user's providers; staff see all."""
    receipts = Receipt.objects.select_related("ticket", "ticket__provider")
    if user.is_staff:
        return receipts
    return receipts.filter(Q(ticket__job__user=user) | Q(ticket__provider__user=user))


def settlements_visible_to(*, user: User) -> QuerySet[Settlement]:
    settlements = Settlement.objects.select_related("provider")
    if user.is_staff:
        return settlements
    return settlements.filter(Q(job__user=user) | Q(provider__user=user))


def audits_visible_to(*, user: User) -> QuerySet[Audit]:
    """Audits of the user's jobs (staff: all). Tensors are deferred: lists never load them."""
    audits = Audit.objects.select_related("provider", "reference_provider", "ticket").defer(
        "inputs", "claimed", "reference"
    )
    return audits if user.is_staff else audits.filter(job__user=user)


def audit_get(*, user: User, audit_id: int) -> Audit:
    try:
        return audits_visible_to(user=user).get(pk=audit_id)
    except Audit.DoesNotExist:
        raise NotFound(f"no audit {audit_id}") from None


def offences_visible_to(*, user: User) -> QuerySet[Offence]:
    """Offences of the user's providers; staff see all of them."""
    offences = Offence.objects.all()
    return offences if user.is_staff else offences.filter(provider__user=user)


def provider_offences(*, provider_id: int) -> QuerySet[Offence]:
    """One provider's offences, newest first (callers check that the reader may see it)."""
    return Offence.objects.filter(provider_id=provider_id)


def disputes_visible_to(*, user: User) -> QuerySet[Dispute]:
    """Disputes of the user's jobs and against the user's providers (staff: all)."""
    disputes = Dispute.objects.select_related("ticket")
    return disputes if user.is_staff else disputes.filter(Q(job__user=user) | Q(provider__user=user))


def dispute_get(*, user: User, dispute_id: int) -> Dispute:
    """One dispute the user may see; NotFound otherwise (existence is not revealed)."""
    dispute = disputes_visible_to(user=user).filter(pk=dispute_id).first()
    if dispute is None:
        raise NotFound(f"no dispute {dispute_id}")
    return dispute
