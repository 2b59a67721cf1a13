"""Money in and out: top-ups paid through a payment provider, and payout requests staff decide.

Both are records beside the ledger: the credits themselves move only through
``marketplace.ledger.services`` (``topup_credit``, ``payout_hold_*``), each movement keyed by the
record it belongs to, so that a record can be applied at most once however often it is
reported or clicked.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class TopUp(models.Model):
    """Credits a user asked to buy, and the checkout that pays for them."""

    class State(models.TextChoices):
        PENDING = "pending"  # checkout created, not paid yet
        PAID = "paid"  # paid and credited to the wallet
        EXPIRED = "expired"  # the checkout ended unpaid

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="topups")
    # Which payment provider runs the checkout ("stripe", "test").
    provider = models.CharField(max_length=16)
    # The provider's id for the checkout (a Stripe Checkout Session id); set once it exists.
    external_id = models.CharField(max_length=255, null=True, blank=True)
    checkout_url = models.URLField(max_length=2000, blank=True)
    credits = models.BigIntegerField(help_text="micro-credits bought")
    # What the buyer pays, in the currency's smallest unit (cents), and the currency (ISO 4217, lower case).
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    # The ledger transaction that credited the wallet (set when paid).
    transaction = models.OneToOneField(
        "ledger.Transaction", null=True, blank=True, on_delete=models.PROTECT, related_name="topup"
    )
    # The request's idempotency key, in the user's namespace: a retried request gets the same checkout.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gt=0), name="payments_topup_credits_positive"),
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="payments_topup_amount_positive"),
            models.CheckConstraint(
                condition=Q(state__in=["pending", "paid", "expired"]), name="payments_topup_state_valid"
            ),
            models.UniqueConstraint(fields=["provider", "external_id"], name="payments_topup_one_per_checkout"),
            models.UniqueConstraint(fields=["user", "idempotency_key"], name="payments_topup_key_unique"),
        ]

    def __str__(self) -> str:
        return f"top-up #{self.pk} ({self.state}, {self.credits})"

    @property
    def price_text(self) -> str:
        """The price for people: ``500`` cents -> ``"5.00 USD"`` (exact, integer arithmetic)."""
        return money_text(self.amount_minor, self.currency)


def money_text(minor: int, currency: str) -> str:
    """An amount in a currency's smallest unit as people write it, per HIVEMART_TOPUP_MINOR_PER_UNIT."""
    per_unit = settings.HIVEMART_TOPUP_MINOR_PER_UNIT
    digits = len(str(per_unit)) - 1 if str(per_unit).strip("0") == "1" else 0
    if digits == 0:
        return f"{minor:,} {currency.upper()}" + ("" if per_unit == 1 else " minor units")
    whole, fraction = divmod(minor, per_unit)
    return f"{whole:,}.{fraction:0{digits}d} {currency.upper()}"


class PaymentEvent(models.Model):
    """A payment provider's event (a webhook delivery), recorded once: a replayed event id is
    recognised and acknowledged without being applied again."""

    provider = models.CharField(max_length=16)
    event_id = models.CharField(max_length=255)
    type = models.CharField(max_length=100)
    topup = models.ForeignKey(TopUp, null=True, blank=True, on_delete=models.PROTECT, related_name="events")
    # What was done with it: "applied", "ignored" (a type we do not act on, or already applied).
    outcome = models.CharField(max_length=16)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [models.UniqueConstraint(fields=["provider", "event_id"], name="payments_event_once")]

    def __str__(self) -> str:
        return f"{self.provider} event {self.event_id} ({self.type})"


class PayoutRequest(models.Model):
    """A provider's operator asks for earnings to be paid out; staff approve or reject.

    requested: the amount is held (earnings -> an escrow account of its own);
    approved: staff paid it out of the platform (escrow -> external) and will send the money;
    paid: staff recorded the outside payment's reference;
    rejected: the held credits went back to the earnings account.
    """

    class State(models.TextChoices):
        REQUESTED = "requested"
        APPROVED = "approved"
        PAID = "paid"
        REJECTED = "rejected"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="payout_requests")
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="payout_requests")
    amount = models.BigIntegerField(help_text="micro-credits")
    state = models.CharField(max_length=10, choices=State.choices, default=State.REQUESTED)
    # The escrow account the requested credits wait in until staff decide.
    hold_account = models.OneToOneField("ledger.Account", on_delete=models.PROTECT, related_name="payout_request")
    memo = models.CharField(max_length=200, blank=True)
    # Staff's note: why it was rejected, or the outside payment's reference.
    note = models.CharField(max_length=200, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    idempotency_key = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="payments_payout_amount_positive"),
            models.CheckConstraint(
                condition=Q(state__in=["requested", "approved", "paid", "rejected"]),
                name="payments_payout_state_valid",
            ),
            models.UniqueConstraint(fields=["user", "idempotency_key"], name="payments_payout_key_unique"),
        ]

    def __str__(self) -> str:
        return f"payout request #{self.pk} ({self.state}, {self.amount})"
