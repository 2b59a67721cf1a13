"""Double-entry credits.

Amounts are integer micro-credits. Every movement is a :class:`Transaction` of two or more
:class:`Posting` rows that sum to zero; a positive posting credits an account, a negative one
debits it. Each :class:`Account` keeps its ``balance`` column equal to the sum of its postings,
updated in the same database transaction as the postings.

What the database itself guarantees (see migration 0002 for the triggers):
- wallet, earnings, escrow and fees balances never go below zero (a CHECK constraint); only
  the one ``external`` account may, because it stands for the world outside the ledger:
  credits granted by staff come from it and payouts go to it, so its balance is minus the
  credits in circulation;
- a transaction is balanced: its header row is written after its postings and a trigger
  refuses it unless they sum to zero, postings cannot be added to a recorded transaction nor
  changed, and on PostgreSQL a deferred constraint trigger re-checks every touched
  transaction at commit;
- idempotency keys are unique. They are stored with their namespace (``user:<id>:`` for a
  key a user sent, ``system:`` for one the system derived; see ``ledger.services``).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Account(models.Model):
    class Kind(models.TextChoices):
        WALLET = "wallet", "user wallet"
        EARNINGS = "earnings", "provider earnings"
        ESCROW = "escrow", "escrow of one hold"
        FEES = "fees", "platform fees"
        EXTERNAL = "external", "external (issuance and payouts)"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The owner: the wallet's user, the provider's operator, the payer of a hold. None for the
    # platform's own accounts (fees, external).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_accounts"
    )
    label = models.CharField(max_length=200, blank=True)
    balance = models.BigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=["wallet", "earnings", "escrow", "fees", "external"]),
                name="ledger_account_kind_valid",
            ),
            models.CheckConstraint(
                condition=Q(kind="external") | Q(balance__gte=0), name="ledger_account_balance_non_negative"
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=["fees", "external"], user__isnull=True)
                    | Q(kind__in=["wallet", "earnings", "escrow"], user__isnull=False)
                ),
                name="ledger_account_owner_matches_kind",
            ),
            models.UniqueConstraint(fields=["user"], condition=Q(kind="wallet"), name="ledger_one_wallet_per_user"),
            models.UniqueConstraint(
                fields=["kind"], condition=Q(kind__in=["fees", "external"]), name="ledger_one_platform_account_per_kind"
            ),
        ]

    def __str__(self) -> str:
        owner = f" of {self.user}" if self.user_id else ""
        return f"{self.kind} #{self.pk}{owner}"


class Hold(models.Model):
    """Credits set aside from a wallet into an escrow account of their own.

    What is left of the hold is its escrow account's balance: captures move credits from
    there to a provider's earnings (and the platform's fees), and closing the hold returns
    the rest to the payer's wallet.
    """

    class State(models.TextChoices):
        OPEN = "open"
        CLOSED = "closed"

    payer = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="holds_paid")
    escrow = models.OneToOneField(Account, on_delete=models.PROTECT, related_name="hold")
    amount = models.BigIntegerField(help_text="credits placed, in micro-credits")
    state = models.CharField(max_length=8, choices=State.choices, default=State.OPEN)
    memo = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="ledger_hold_amount_positive"),
            models.CheckConstraint(condition=Q(state__in=["open", "closed"]), name="ledger_hold_state_valid"),
        ]

    def __str__(self) -> str:
        return f"hold #{self.pk} ({self.state}, {self.amount})"


class Transaction(models.Model):
    class Kind(models.TextChoices):
        GRANT = "grant"
        HOLD = "hold"
        CAPTURE = "capture"
        RELEASE = "release"
        PAYOUT = "payout"
        CLAWBACK = "clawback"
        FORFEIT = "forfeit"
        # Money in and out (marketplace.payments): a paid top-up, and a payout request's
        # credits set aside from earnings, then paid out (PAYOUT) or returned (PAYOUT_RELEASE).
        TOPUP = "topup"
        PAYOUT_HOLD = "payout_hold"
        PAYOUT_RELEASE = "payout_release"

    # Chosen by the service before the postings are written (they reference it; the header
    # row comes last), hence a UUID rather than a database sequence.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Namespaced: "user:<id>:<key as sent>" or "system:<key>" (see ledger.services).
    idempotency_key = models.CharField(max_length=200, unique=True, null=True, blank=True)
    hold = models.ForeignKey(Hold, null=True, blank=True, on_delete=models.PROTECT, related_name="transactions")
    memo = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.pk}"

    @staticmethod
    def key_as_sent(stored: str | None) -> str | None:
        """A stored idempotency key without its namespace: what its owner sent (or the system derived)."""
        if stored is None:
            return None
        if stored.startswith("user:"):
            return stored.split(":", 2)[2]
        return stored.removeprefix("system:")

    @property
    def request_key(self) -> str | None:
        """This transaction's idempotency key as it was sent."""
        return self.key_as_sent(self.idempotency_key)


class Posting(models.Model):
    transaction = models.ForeignKey(Transaction, on_delete=models.PROTECT, related_name="postings")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="postings")
    amount = models.BigIntegerField(help_text="micro-credits; positive credits the account, negative debits it")

    class Meta:
        ordering = ["id"]
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="ledger_posting_amount_nonzero")]

    def __str__(self) -> str:
        return f"{self.amount:+d} on account #{self.account_id}"
