"""Money in (top-ups) and out (payout requests). Credits move only through the ledger's
services, each movement keyed by the record it belongs to:

- a top-up is credited with the system key ``topup:<id>``, so a checkout reported paid twice
  (the same event replayed, two events for one session, a user clicking twice) credits once;
- a payout request holds its amount with ``payout-request:<user>:<key>`` and is paid or
  released with ``payout-request:<id>:pay`` / ``:release``; its row lock orders deciders.

Every payment provider's report passes through :func:`payment_notice_apply`, which trusts
nothing it did not create: the checkout must be one of ours, made for that top-up, and the
amount and currency paid must be what we asked for.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.accounts.models import User
from marketplace.common.errors import (
    ApplicationError,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidTransition,
    NotFound,
    PermissionDenied,
    ValidationFailed,
)
from marketplace.ledger.services import (
    IDEMPOTENCY_KEY_MAX,
    MAX_AMOUNT,
    payout_hold_pay,
    payout_hold_place,
    payout_hold_release,
    topup_credit,
    wallet_get_or_create,
)
from marketplace.payments.gateways import (
    GatewayError,
    PaymentNotice,
    TestGateway,
    gateway_for_new_topups,
    gateway_get,
)
from marketplace.payments.models import PaymentEvent, PayoutRequest, TopUp
from marketplace.providers.models import Provider

__all__ = [
    "MICRO",
    "topup_price",
    "topup_create",
    "topup_test_pay",
    "payment_webhook_handle",
    "payment_notice_apply",
    "payout_request_create",
    "payout_approve",
    "payout_reject",
    "payout_mark_paid",
]

logger = logging.getLogger(__name__)

MICRO = 1_000_000  # micro-credits per credit


def _check_int(value: object, field: str, low: int, high: int, unit: str) -> int:
    # bool is an int subclass; True is not an amount.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValidationFailed(f"{field} must be a whole number of {unit} from {low} to {high}", extra={"field": field})
    return value


def _check_key(key: str | None) -> str | None:
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= IDEMPOTENCY_KEY_MAX - 40):
        raise ValidationFailed(
            f"an idempotency key is a string of 1 to {IDEMPOTENCY_KEY_MAX - 40} characters",
            extra={"field": "idempotency_key"},
        )
    return key


# --- top-ups --------------------------------------------------------------------------------


def topup_price(*, credits: int) -> int:
    """What ``credits`` whole credits cost, in the currency's smallest unit, rounded up (never below one)."""
    minor = credits * settings.HIVEMART_TOPUP_MINOR_PER_UNIT
    return max(1, -(-minor // settings.HIVEMART_TOPUP_CREDITS_PER_UNIT))


def topup_create(
    *, user: User, credits: int, success_url: str, cancel_url: str, idempotency_key: str | None = None
) -> TopUp:
    """Start buying ``credits`` whole credits: a pending top-up and the payment provider's
    checkout for it (``topup.checkout_url``, where the buyer pays). The wallet is credited when
    the provider reports the checkout paid. A retried request with the same key gets the same
    top-up; the provider's own call is keyed by the top-up, so a lost reply costs nothing."""
    credits = _check_int(
        credits, "credits", settings.HIVEMART_TOPUP_MIN_CREDITS, settings.HIVEMART_TOPUP_MAX_CREDITS, "credits"
    )
    key = _check_key(idempotency_key)
    gateway = gateway_for_new_topups()
    if key is not None and (previous := TopUp.objects.filter(user=user, idempotency_key=key).first()) is not None:
        if previous.credits != credits * MICRO:
            raise IdempotencyConflict(
                "this idempotency key was used for a top-up of another amount", extra={"idempotency_key": key}
            )
        if previous.checkout_url:
            return previous
        topup = previous  # the provider's call failed or was cut short: try it again
    else:
        try:
            with transaction.atomic():
                topup = TopUp.objects.create(
                    user=user,
                    provider=gateway.name,
                    credits=credits * MICRO,
                    amount_minor=topup_price(credits=credits),
                    currency=settings.HIVEMART_TOPUP_CURRENCY,
                    idempotency_key=key,
                )
        except IntegrityError:
            raise Conflict(
                "a concurrent request with this idempotency key won; retry to get its result",
                extra={"idempotency_key": key},
            ) from None
    # The provider is called outside any database transaction: no lock waits on the network.
    checkout = gateway.checkout_create(topup=topup, success_url=success_url, cancel_url=cancel_url)
    try:
        TopUp.objects.filter(pk=topup.pk).update(external_id=checkout.external_id, checkout_url=checkout.url)
    except IntegrityError:
        raise GatewayError("the payment provider returned a checkout that belongs to another top-up") from None
    topup.external_id, topup.checkout_url = checkout.external_id, checkout.url
    logger.info("top-up %s: %s checkout %s for user %s", topup.pk, gateway.name, checkout.external_id, user.pk)
    return topup


def _topup_apply(topup: TopUp) -> bool:
    """Credit a locked, pending top-up's wallet. False when it was credited before."""
    if topup.state == TopUp.State.PAID:
        return False
    tx = topup_credit(
        account=wallet_get_or_create(user=topup.user),
        amount=topup.credits,
        idempotency_key=f"topup:{topup.pk}",
        memo=f"top-up #{topup.pk} ({topup.provider})",
    )
    topup.state, topup.transaction, topup.paid_at = TopUp.State.PAID, tx, timezone.now()
    topup.save(update_fields=["state", "transaction", "paid_at"])
    logger.info("top-up %s paid: %s micro-credits to user %s", topup.pk, topup.credits, topup.user_id)
    return True


@transaction.atomic
def topup_test_pay(*, user: User, topup_id: int) -> TopUp:
    """Pay one of your own test top-ups (the test payment provider's button). Only where the
    test provider is enabled; another user's top-up is not found; paying twice credits once."""
    gateway_get(TestGateway.name)  # PaymentsUnavailable where test top-ups are off
    topup = TopUp.objects.select_for_update().filter(pk=topup_id, user=user, provider=TestGateway.name).first()
    if topup is None:
        raise NotFound(f"no test top-up {topup_id} of yours")
    if topup.state == TopUp.State.EXPIRED:
        raise InvalidTransition(f"top-up #{topup.pk} has expired; start a new one")
    _topup_apply(topup)
    return topup


def payment_webhook_handle(*, gateway_name: str, payload: bytes, headers: Mapping[str, str]) -> str:
    """Authenticate and apply one webhook delivery; returns what was done ("applied",
    "ignored", "replayed"). Raises (and records nothing) when the report is refused."""
    gateway = gateway_get(gateway_name)
    notice = gateway.notice_parse(payload=payload, headers=headers)
    return payment_notice_apply(gateway_name=gateway.name, notice=notice)


class PaymentMismatch(ApplicationError):
    """A provider reported a payment that does not match the checkout we created."""

    status, code = 400, "payment_mismatch"


@transaction.atomic
def payment_notice_apply(*, gateway_name: str, notice: PaymentNotice) -> str:
    """Apply an authenticated provider report to our top-ups, once per event id.

    Refused (PaymentMismatch, nothing recorded, the provider may redeliver): a checkout we did
    not create, one made for another top-up, or a payment of another amount or currency.
    """
    try:
        with transaction.atomic():
            event = PaymentEvent.objects.create(
                provider=gateway_name, event_id=notice.event_id[:255], type=notice.type[:100], outcome="ignored"
            )
    except IntegrityError:
        return "replayed"
    if not (notice.paid or notice.expired) or notice.external_id is None:
        return "ignored"
    topup = (
        TopUp.objects.select_for_update()
        .filter(provider=gateway_name, external_id=notice.external_id)
        .select_related("user")
        .first()
    )
    if topup is None:
        raise PaymentMismatch(
            f"no top-up has the checkout {notice.external_id}", extra={"checkout": notice.external_id}
        )
    if notice.reference != str(topup.pk):
        raise PaymentMismatch(
            "the checkout's reference does not name the top-up it was created for",
            extra={"checkout": topup.external_id},
        )
    event.topup = topup
    if notice.paid:
        if notice.amount_minor != topup.amount_minor or notice.currency != topup.currency:
            raise PaymentMismatch(
                f"paid {notice.amount_minor} {notice.currency}, top-up #{topup.pk} asked "
                f"{topup.amount_minor} {topup.currency}",
                extra={"topup": topup.pk},
            )
        event.outcome = "applied" if _topup_apply(topup) else "ignored"
    elif topup.state == TopUp.State.PENDING:
        topup.state = TopUp.State.EXPIRED
        topup.save(update_fields=["state"])
        event.outcome = "applied"
    event.save(update_fields=["topup", "outcome"])
    return event.outcome


# --- payouts --------------------------------------------------------------------------------


def payout_request_create(
    *, user: User, provider_id: int, amount: int, memo: str = "", idempotency_key: str | None = None
) -> PayoutRequest:
    """Ask for ``amount`` micro-credits of one of your providers' earnings to be paid out. The
    amount is held at once (InsufficientCredits beyond what the earnings hold), so it can be
    neither spent twice nor requested twice; staff then approve or reject. A retried request
    with the same key returns the same request."""
    amount = _check_int(amount, "amount", 1, MAX_AMOUNT, "micro-credits")
    key = _check_key(idempotency_key) or uuid.uuid4().hex
    if not isinstance(memo, str) or len(memo) > 200:
        raise ValidationFailed("memo is a text of at most 200 characters", extra={"field": "memo"})
    provider = Provider.objects.select_related("earnings_account").filter(pk=provider_id, user=user).first()
    if provider is None:
        raise NotFound(f"no provider {provider_id} of yours")
    previous = PayoutRequest.objects.filter(user=user, idempotency_key=key).first()
    if previous is not None:
        if previous.provider_id != provider.pk or previous.amount != amount:
            raise IdempotencyConflict(
                "this idempotency key was used for another payout request", extra={"idempotency_key": key}
            )
        return previous
    try:
        with transaction.atomic():
            escrow, _ = payout_hold_place(
                source=provider.earnings_account,
                amount=amount,
                idempotency_key=f"payout-request:{user.pk}:{key}",
                requested_by=user,
                memo=f"payout requested for provider #{provider.pk}",
            )
            request = PayoutRequest.objects.create(
                user=user, provider=provider, amount=amount, hold_account=escrow, memo=memo, idempotency_key=key
            )
    except InsufficientCredits:
        available = type(provider.earnings_account).objects.get(pk=provider.earnings_account_id).balance
        raise InsufficientCredits(
            f"provider #{provider.pk} has {available} micro-credits of earnings available, {amount} requested; "
            "request at most that (earlier requests still waiting hold theirs)",
            extra={"available": available, "requested": amount, "field": "amount"},
        ) from None
    except IntegrityError:
        raise Conflict(
            "a concurrent request with this idempotency key won; retry to get its result",
            extra={"idempotency_key": key},
        ) from None
    logger.info("payout request %s: %s micro-credits from provider %s", request.pk, amount, provider.pk)
    return request


def _decide(request_id: int, by: User) -> PayoutRequest:
    if not by.is_staff:
        raise PermissionDenied("only staff decide payout requests")
    request = PayoutRequest.objects.select_for_update().select_related("hold_account", "provider").filter(pk=request_id)
    found = request.first()
    if found is None:
        raise NotFound(f"no payout request {request_id}")
    return found


@transaction.atomic
def payout_approve(*, request_id: int, by: User, note: str = "") -> PayoutRequest:
    """Staff: approve a requested payout: its held credits leave the platform (to the external
    account), and staff owe the provider that money. Approving again changes nothing."""
    request = _decide(request_id, by)
    if request.state in (PayoutRequest.State.APPROVED, PayoutRequest.State.PAID):
        return request
    if request.state != PayoutRequest.State.REQUESTED:
        raise InvalidTransition(f"payout request #{request.pk} is {request.state}; only a requested one is approved")
    payout_hold_pay(
        escrow=request.hold_account,
        idempotency_key=f"payout-request:{request.pk}:pay",
        decided_by=by,
        memo=f"payout request #{request.pk} approved",
    )
    request.state, request.decided_by, request.decided_at = PayoutRequest.State.APPROVED, by, timezone.now()
    request.note = note[:200] or request.note
    request.save(update_fields=["state", "decided_by", "decided_at", "note"])
    logger.info("payout request %s approved by %s", request.pk, by.pk)
    return request


@transaction.atomic
def payout_reject(*, request_id: int, by: User, note: str = "") -> PayoutRequest:
    """Staff: reject a requested payout; its held credits return to the provider's earnings.
    Rejecting again changes nothing; an approved payout cannot be rejected."""
    request = _decide(request_id, by)
    if request.state == PayoutRequest.State.REJECTED:
        return request
    if request.state != PayoutRequest.State.REQUESTED:
        raise InvalidTransition(f"payout request #{request.pk} is {request.state}; only a requested one is rejected")
    payout_hold_release(
        escrow=request.hold_account,
        to=request.provider.earnings_account,
        idempotency_key=f"payout-request:{request.pk}:release",
        decided_by=by,
        memo=f"payout request #{request.pk} rejected",
    )
    request.state, request.decided_by, request.decided_at = PayoutRequest.State.REJECTED, by, timezone.now()
    request.note = note[:200]
    request.save(update_fields=["state", "decided_by", "decided_at", "note"])
    logger.info("payout request %s rejected by %s", request.pk, by.pk)
    return request


@transaction.atomic
def payout_mark_paid(*, request_id: int, by: User, reference: str) -> PayoutRequest:
    """Staff: record that an approved payout's money was sent (``reference``: the bank transfer's
    or payment's id). Marking it again changes nothing."""
    if not isinstance(reference, str) or not 0 < len(reference.strip()) <= 200:
        raise ValidationFailed("give the payment's reference (1 to 200 characters)", extra={"field": "reference"})
    request = _decide(request_id, by)
    if request.state == PayoutRequest.State.PAID:
        return request
    if request.state != PayoutRequest.State.APPROVED:
        raise InvalidTransition(f"payout request #{request.pk} is {request.state}; approve it before marking it paid")
    request.state, request.note, request.paid_at = PayoutRequest.State.PAID, reference.strip(), timezone.now()
    request.save(update_fields=["state", "note", "paid_at"])
    return request
