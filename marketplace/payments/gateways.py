"""Payment providers behind one small interface: a checkout to create, and events to read.

A :class:`PaymentGateway` knows how to start a payment for a :class:`~marketplace.payments.models.TopUp`
(a hosted checkout page the buyer is sent to) and how to turn what the provider later
reports (a webhook delivery) into a :class:`PaymentNotice`, after checking that the report
really comes from the provider. What a notice means for the ledger is decided in
``marketplace.payments.services``, the same way for every gateway.

Two gateways exist: :class:`StripeCheckout` (Stripe Checkout Sessions, through the ``stripe``
package) and :class:`TestGateway`, which pays on a button of this site and exists so that a
demo or a developer's machine runs with no account anywhere; it is off in production unless
``HIVEMART_TEST_TOPUPS`` turns it on.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import stripe
from django.conf import settings

from marketplace.common.errors import ApplicationError, AuthenticationFailed, ValidationFailed
from marketplace.payments.models import TopUp

__all__ = [
    "Checkout",
    "PaymentNotice",
    "PaymentGateway",
    "PaymentsUnavailable",
    "GatewayError",
    "StripeCheckout",
    "TestGateway",
    "gateway_get",
    "gateway_for_new_topups",
]


class PaymentsUnavailable(ApplicationError):
    """No payment provider is configured on this marketplace."""

    status, code = 503, "payments_unavailable"


class GatewayError(ApplicationError):
    """The payment provider refused or could not be reached; nothing was charged."""

    status, code = 502, "payment_provider_error"


@dataclass(frozen=True)
class Checkout:
    """A payment page the buyer is sent to: the provider's id for it, and its address."""

    external_id: str
    url: str


@dataclass(frozen=True)
class PaymentNotice:
    """What a provider reported about a checkout, its authenticity checked."""

    event_id: str
    type: str
    external_id: str | None  # the checkout it is about (None: an event about something else)
    reference: str | None  # the reference we gave the checkout (our top-up's id)
    amount_minor: int | None  # what was paid, in the currency's smallest unit
    currency: str | None
    paid: bool  # the checkout is paid: credit the top-up
    expired: bool  # the checkout ended unpaid


class PaymentGateway(ABC):
    """One payment provider."""

    name: str

    @abstractmethod
    def checkout_create(self, *, topup: TopUp, success_url: str, cancel_url: str) -> Checkout:
        """Start a payment of ``topup.amount_minor`` ``topup.currency`` for ``topup``."""

    @abstractmethod
    def notice_parse(self, *, payload: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Check that ``payload`` comes from the provider and read it (AuthenticationFailed if not)."""


def _check_url(url: object) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or len(url) > 2000:
        raise GatewayError("the payment provider answered without a usable checkout address")
    return url


class StripeCheckout(PaymentGateway):
    """Stripe Checkout: a Checkout Session per top-up, paid on Stripe's page; Stripe then calls
    our webhook with ``checkout.session.completed``, signed with the endpoint's secret."""

    name = "stripe"
    PAID_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
    ENDED_EVENTS = ("checkout.session.expired", "checkout.session.async_payment_failed")

    def __init__(self, *, secret_key: str, webhook_secret: str, api_base: str) -> None:
        self.secret_key, self.webhook_secret, self.api_base = secret_key, webhook_secret, api_base

    def _client(self) -> stripe.StripeClient:
        return stripe.StripeClient(self.secret_key, base_addresses={"api": self.api_base}, max_network_retries=2)

    def checkout_create(self, *, topup: TopUp, success_url: str, cancel_url: str) -> Checkout:
        params: Any = {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": topup.currency,
                        "unit_amount": topup.amount_minor,
                        "product_data": {"name": f"Hivemart credits ({topup.credits // 1_000_000} credits)"},
                    },
                }
            ],
            "client_reference_id": str(topup.pk),
            "metadata": {"topup": str(topup.pk), "user": str(topup.user_id)},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        try:
            # Stripe's own idempotency key: a retried call (a lost reply) gets the same session.
            session = self._client().v1.checkout.sessions.create(
                params=params, options={"idempotency_key": f"hivemart-topup-{topup.pk}"}
            )
        except stripe.StripeError as e:
            raise GatewayError(
                f"Stripe refused the checkout: {e.user_message or e.__class__.__name__}; try again later"
            ) from e
        if not isinstance(session.id, str) or not 0 < len(session.id) <= 255:
            raise GatewayError("Stripe answered without a checkout session id")
        return Checkout(external_id=session.id, url=_check_url(session.url))

    def notice_parse(self, *, payload: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        signature = headers.get("Stripe-Signature")
        if not signature:
            raise AuthenticationFailed("no Stripe-Signature header", code="bad_signature")
        text = payload.decode("utf-8", errors="replace")
        try:
            # Stripe's own check: t=<time>,v1=<HMAC-SHA256 of "t.payload">, at most 5 minutes old.
            stripe.WebhookSignature.verify_header(text, signature, self.webhook_secret, tolerance=300)
        except stripe.SignatureVerificationError:
            raise AuthenticationFailed(
                "the Stripe-Signature does not match this endpoint's secret (or is too old)", code="bad_signature"
            ) from None
        try:
            event = json.loads(payload)
        except ValueError:
            raise ValidationFailed("the webhook body is not a Stripe event") from None
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("id"), str)
            or not isinstance(event.get("type"), str)
        ):
            raise ValidationFailed("the webhook body is not a Stripe event")
        data = event.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        obj = obj if isinstance(obj, dict) else {}
        kind: str = event["type"]
        is_session = kind.startswith("checkout.session.") and obj.get("object") == "checkout.session"
        amount, currency = obj.get("amount_total"), obj.get("currency")
        return PaymentNotice(
            event_id=event["id"],
            type=kind,
            external_id=obj["id"] if is_session and isinstance(obj.get("id"), str) else None,
            reference=obj.get("client_reference_id") if is_session else None,
            amount_minor=amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
            currency=currency if isinstance(currency, str) else None,
            paid=is_session and kind in self.PAID_EVENTS and obj.get("payment_status") == "paid",
            expired=is_session and kind in self.ENDED_EVENTS,
        )


class TestGateway(PaymentGateway):
    """Pays on a button of this site (``/wallet/topups/<id>/pay/``): no account anywhere, no
    money. For demos and development; off in production unless explicitly enabled."""

    name = "test"

    def checkout_create(self, *, topup: TopUp, success_url: str, cancel_url: str) -> Checkout:
        return Checkout(external_id=f"test_{topup.pk}", url=f"/wallet/topups/{topup.pk}/pay/")

    def notice_parse(self, *, payload: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        raise AuthenticationFailed("the test payment provider takes no webhooks")


def _stripe() -> StripeCheckout | None:
    if not settings.HIVEMART_STRIPE_SECRET_KEY:
        return None
    return StripeCheckout(
        secret_key=settings.HIVEMART_STRIPE_SECRET_KEY,
        webhook_secret=settings.HIVEMART_STRIPE_WEBHOOK_SECRET,
        api_base=settings.HIVEMART_STRIPE_API_BASE,
    )


def gateway_get(name: str) -> PaymentGateway:
    """The gateway called ``name`` if it is configured here (PaymentsUnavailable otherwise)."""
    if name == StripeCheckout.name and (gateway := _stripe()) is not None:
        return gateway
    if name == TestGateway.name and settings.HIVEMART_TEST_TOPUPS:
        return TestGateway()
    raise PaymentsUnavailable(f"the payment provider {name!r} is not configured on this marketplace")


def gateway_for_new_topups() -> PaymentGateway:
    """Stripe when a key is configured, else the test gateway where it is enabled."""
    if (gateway := _stripe()) is not None:
        return gateway
    if settings.HIVEMART_TEST_TOPUPS:
        return TestGateway()
    raise PaymentsUnavailable(
        "top-ups are not configured on this marketplace: an operator sets HIVEMART_STRIPE_SECRET_KEY "
        "(see docs/operators.md); until then staff grant credits"
    )
