"""Reads: top-ups and payout requests, each visible to its owner (staff see all)."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.payments.models import PayoutRequest, TopUp


def topups_visible_to(*, user: User) -> QuerySet[TopUp]:
    topups = TopUp.objects.all()
    return topups if user.is_staff else topups.filter(user=user)


def topup_get(*, user: User, topup_id: int) -> TopUp:
    try:
        return topups_visible_to(user=user).get(pk=topup_id)
    except TopUp.DoesNotExist:
        raise NotFound(f"no top-up {topup_id}") from None


def payout_requests_visible_to(*, user: User) -> QuerySet[PayoutRequest]:
    requests = PayoutRequest.objects.select_related("provider", "user")
    return requests if user.is_staff else requests.filter(user=user)


def payout_request_get(*, user: User, request_id: int) -> PayoutRequest:
    try:
        return payout_requests_visible_to(user=user).get(pk=request_id)
    except PayoutRequest.DoesNotExist:
        raise NotFound(f"no payout request {request_id}") from None


def payout_requests_waiting() -> QuerySet[PayoutRequest]:
    """Requests staff have to decide (requested) or pay (approved), oldest first."""
    return (
        PayoutRequest.objects.select_related("provider", "user")
        .filter(state__in=[PayoutRequest.State.REQUESTED, PayoutRequest.State.APPROVED])
        .order_by("id")
    )
