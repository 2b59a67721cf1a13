"""Tickets, work receipts, settlements, audits and offences.

- :class:`Ticket`: the marketplace's signed permission for one provider to bill one job for
  one segment of its plan (``hivemart_core.protocol.tickets``). Its ``settled_units`` and
  ``settled_amount`` are the running totals settlement has paid for, across all sessions.
- :class:`Receipt`: the newest receipt (highest ``seq``) per (ticket, session). Receipts are
  cumulative, so the newest one supersedes the rest; ``settled_units`` is how much of it
  settlement has accounted for.
  ``acked_units`` is the part of it the client countersigned.
- :class:`Settlement`: one capture (or shortfall) per (job, provider) per settlement run.
- :class:`Dispute`: a receipt the client refused to countersign, reported with the receipt.
- :class:`Audit`: a client's report that a provider's output differed from a backup's, and
  the validator's verdict.
- :class:`Offence`: what a provider was found doing (failed audit, wrong probe answer).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Ticket(models.Model):
    class Role(models.TextChoices):
        PRIMARY = "primary"
        BACKUP = "backup"

    ticket_id = models.CharField(max_length=64, unique=True)
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="tickets")
    plan = models.ForeignKey("jobs.Plan", on_delete=models.CASCADE, related_name="tickets")
    segment = models.PositiveIntegerField(help_text="index of the plan segment")
    role = models.CharField(max_length=8, choices=Role.choices)
    rank = models.PositiveIntegerField(default=0, help_text="backup rank (0 for the primary)")
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="tickets")
    block_start = models.PositiveIntegerField()
    block_end = models.PositiveIntegerField()
    price = models.BigIntegerField(help_text="micro-credits per million work units")
    max_units = models.BigIntegerField()
    expires_at = models.DateTimeField()
    signed = models.JSONField(help_text="the signed ticket as sent to clients and providers")
    settled_units = models.BigIntegerField(default=0, help_text="work units settlement has accounted for")
    settled_amount = models.BigIntegerField(default=0, help_text="micro-credits paid for this ticket so far")
    credit_units = models.BigIntegerField(
        default=0, help_text="the credit window: units payable beyond the client's countersignatures"
    )
    acked_units = models.BigIntegerField(default=0, help_text="countersigned units settlement has accounted for")
    spend_cap = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="micro-credits the tickets of this plan segment may be paid in all "
        "(its share of the hold); null: only the hold bounds it",
    )
    disputed_at = models.DateTimeField(
        null=True, blank=True, help_text="set while the client disputes a receipt: no credit window is paid"
    )
    voided_at = models.DateTimeField(null=True, blank=True, help_text="set when an audit found the provider cheating")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job_id", "plan_id", "segment", "rank", "role"]
        constraints = [
            models.CheckConstraint(condition=Q(role__in=["primary", "backup"]), name="receipts_ticket_role_valid"),
            models.CheckConstraint(condition=Q(max_units__gt=0) & Q(price__gte=0), name="receipts_ticket_bounds"),
            models.CheckConstraint(
                condition=Q(settled_units__gte=0) & Q(settled_amount__gte=0),
                name="receipts_ticket_settled_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(credit_units__gte=0)
                & Q(acked_units__gte=0)
                & (Q(spend_cap__isnull=True) | Q(spend_cap__gte=models.F("settled_amount"))),
                name="receipts_ticket_credit_within_cap",
            ),
        ]
        indexes = [
            models.Index(fields=["job", "provider"], name="receipts_ticket_job_provider"),
            models.Index(fields=["plan", "segment"], name="receipts_ticket_plan_segment"),
        ]

    def __str__(self) -> str:
        return f"ticket {self.ticket_id} (job #{self.job_id}, {self.role} of segment {self.segment})"


# A receipt with work or acknowledgements that settlement has not accounted for yet.
UNSETTLED = Q(units__gt=models.F("settled_units")) | Q(acked_units__gt=models.F("settled_acked"))


class Receipt(models.Model):
    ticket = models.ForeignKey(Ticket, on_delete=models.CASCADE, related_name="receipts")
    session_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    units = models.BigIntegerField()
    steps = models.BigIntegerField()
    chain = models.CharField(max_length=64)
    issued_at = models.BigIntegerField(help_text="unix seconds, as the provider stated")
    provider_signature = models.CharField(max_length=128)
    client_signature = models.CharField(max_length=128, blank=True)
    settled_units = models.BigIntegerField(default=0)
    acked_units = models.BigIntegerField(default=0, help_text="the most units the client countersigned")
    settled_acked = models.BigIntegerField(default=0, help_text="acked_units settlement has accounted for")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["ticket_id", "session_id"]
        constraints = [
            models.UniqueConstraint(fields=["ticket", "session_id"], name="receipts_one_per_ticket_session"),
            models.CheckConstraint(
                condition=Q(settled_units__gte=0) & Q(settled_units__lte=models.F("units")),
                name="receipts_settled_within_units",
            ),
        ]
        indexes = [models.Index(fields=["ticket"], condition=UNSETTLED, name="receipts_unsettled_or_unacked")]

    def __str__(self) -> str:
        return f"receipt {self.ticket_id}/{self.session_id}#{self.seq} ({self.units} units)"


class Settlement(models.Model):
    """What one settlement run paid a provider for a job: ``amount`` captured from the hold
    (``transaction``), ``shortfall`` owed but beyond what was left of the hold."""

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="settlements")
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="settlements")
    units = models.BigIntegerField()
    amount = models.BigIntegerField()
    shortfall = models.BigIntegerField(default=0)
    transaction = models.ForeignKey(
        "ledger.Transaction", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gte=0) & Q(shortfall__gte=0) & Q(units__gte=0),
                name="receipts_settlement_non_negative",
            )
        ]


class Audit(models.Model):
    class State(models.TextChoices):
        OPEN = "open"
        DECIDED = "decided"

    class DepositState(models.TextChoices):
        NONE = "none"
        HELD = "held"
        RETURNED = "returned"
        FORFEITED = "forfeited"

    class Verdict(models.TextChoices):
        PROVIDER_CHEATED = "provider_cheated"
        REPORTER_WRONG = "reporter_wrong"
        BACKUP_CHEATED = "backup_cheated"
        INCONCLUSIVE = "inconclusive"

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="audits")
    reporter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    ticket = models.ForeignKey(Ticket, on_delete=models.PROTECT, related_name="audits")
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="audits")
    reference_provider = models.ForeignKey(
        "providers.Provider", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    session_id = models.CharField(max_length=64)
    block_start = models.PositiveIntegerField()
    block_end = models.PositiveIntegerField()
    dtype = models.CharField(max_length=16)
    inputs = models.BinaryField()
    claimed = models.BinaryField()
    reference = models.BinaryField()
    # The client proved that ``claimed`` is an output the provider signed for: a provider-signed
    # receipt whose hash chain, recomputed from the client's output digests, contains it.
    claimed_proven = models.BooleanField(default=False)
    # Credits the reporter put down (a hold on its wallet) to file without evidence: returned
    # when the provider is found cheating, forfeited to the platform when the audit proves nothing.
    deposit = models.BigIntegerField(default=0)
    deposit_hold = models.OneToOneField(
        "ledger.Hold", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    deposit_state = models.CharField(max_length=10, choices=DepositState.choices, default=DepositState.NONE)
    # Bytes of the three tensors while they are kept (until the verdict): what the reporter's
    # storage quota (HIVEMART_AUDIT_QUOTA_BYTES) counts.
    stored_bytes = models.BigIntegerField(default=0)
    state = models.CharField(max_length=8, choices=State.choices, default=State.OPEN)
    verdict = models.CharField(max_length=20, choices=Verdict.choices, blank=True)
    detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=["open", "decided"]), name="receipts_audit_state_valid"),
            models.CheckConstraint(
                condition=Q(deposit__gte=0) & Q(stored_bytes__gte=0), name="receipts_audit_deposit_bytes_non_negative"
            ),
        ]
        indexes = [models.Index(fields=["reporter"], condition=Q(stored_bytes__gt=0), name="receipts_audit_stored")]


class Offence(models.Model):
    class Kind(models.TextChoices):
        AUDIT = "audit", "failed an audit"
        PROBE = "probe", "answered a probe wrongly"

    provider = models.ForeignKey("providers.Provider", on_delete=models.CASCADE, related_name="offences")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    audit = models.OneToOneField(Audit, null=True, blank=True, on_delete=models.SET_NULL, related_name="offence")
    detail = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-at", "-id"]


class Dispute(models.Model):
    """The client refused to countersign ``receipt`` (``code``: the check it failed, e.g.
    ``receipt_units``). While a ticket has an open dispute its credit window is not paid;
    staff decide it (``dispute_verdict_record``), as an audit's verdict is recorded."""

    class State(models.TextChoices):
        OPEN = "open"
        DECIDED = "decided"

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="disputes")
    ticket = models.ForeignKey(Ticket, on_delete=models.PROTECT, related_name="disputes")
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="disputes")
    reporter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    session_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    units = models.BigIntegerField(help_text="units the refused receipt claims")
    code = models.CharField(max_length=32, help_text="why the client refused it")
    message = models.CharField(max_length=300, blank=True)
    receipt = models.JSONField(help_text="the provider-signed receipt the client refused")
    state = models.CharField(max_length=8, choices=State.choices, default=State.OPEN)
    verdict = models.CharField(max_length=20, choices=Audit.Verdict.choices, blank=True)
    detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=["open", "decided"]), name="receipts_dispute_state_valid"),
            models.UniqueConstraint(fields=["ticket", "session_id", "seq"], name="receipts_one_dispute_per_receipt"),
        ]
