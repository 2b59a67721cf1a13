"""Reads: top-ups and payout requests, each visible to its owner (staff see all)."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import QuerySet

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.payments.gateways import PaymentsUnavailable, gateway_for_new_topups
from marketplace.payments.models import PayoutRequest, TopUp, money_text


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


def own_topups(*, user: User, limit: int = 10) -> QuerySet[TopUp]:
    """The user's latest top-ups (pending, paid or expired), newest first."""
    return TopUp.objects.filter(user=user).order_by("-id")[:limit]


@dataclass(frozen=True)
class TopUpOffer:
    """What a top-up form offers: through which provider, at what price, in what range."""

    provider: str  # "stripe", "test", or "" when top-ups are off here
    currency: str  # upper case, for people
    credits_per_unit: int
    minor_per_unit: int
    min_credits: int
    max_credits: int

    @property
    def rate_text(self) -> str:
        """``"100 credits cost 1.00 USD"``."""
        return f"{self.credits_per_unit:,} credits cost {money_text(self.minor_per_unit, self.currency)}"

    @property
    def range_text(self) -> str:
        return f"{self.min_credits:,} to {self.max_credits:,} credits"


def topup_offer() -> TopUpOffer:
    try:
        provider = gateway_for_new_topups().name
    except PaymentsUnavailable:
        provider = ""
    return TopUpOffer(
        provider=provider,
        currency=settings.HIVEMART_TOPUP_CURRENCY.upper(),
        credits_per_unit=settings.HIVEMART_TOPUP_CREDITS_PER_UNIT,
        minor_per_unit=settings.HIVEMART_TOPUP_MINOR_PER_UNIT,
        min_credits=settings.HIVEMART_TOPUP_MIN_CREDITS,
        max_credits=settings.HIVEMART_TOPUP_MAX_CREDITS,
    )
