"""Jobs, their state machine, and their plans (who serves which blocks, at what price)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Job(models.Model):
    class Kind(models.TextChoices):
        INFERENCE = "inference"
        FINETUNE = "finetune"

    class State(models.TextChoices):
        PENDING = "pending"  # created, credits held, waiting for a plan
        PLANNED = "planned"  # the scheduler stored a plan
        RUNNING = "running"  # the client is using the swarm
        SETTLING = "settling"  # work is over; receipts are being settled
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    model = models.ForeignKey("catalog.CatalogModel", on_delete=models.PROTECT, related_name="jobs")
    budget = models.BigIntegerField(help_text="micro-credits held for this job")
    max_price = models.BigIntegerField(help_text="highest acceptable price, micro-credits per million work units")
    min_throughput = models.FloatField(null=True, blank=True, help_text="work units per second, optional")
    idempotency_key = models.CharField(max_length=200)
    # The client's per-job Ed25519 public key (hex), bound into every ticket so that the client
    # can countersign receipts; empty when the client has none (provider-signed receipts only).
    client_key = models.CharField(max_length=64, blank=True, default="")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    hold = models.OneToOneField("ledger.Hold", null=True, blank=True, on_delete=models.PROTECT, related_name="job")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "idempotency_key"], name="jobs_idempotency_key_per_user"),
            models.CheckConstraint(condition=Q(budget__gt=0), name="jobs_budget_positive"),
            models.CheckConstraint(condition=Q(max_price__gte=0), name="jobs_max_price_non_negative"),
            models.CheckConstraint(condition=Q(kind__in=["inference", "finetune"]), name="jobs_kind_valid"),
            models.CheckConstraint(
                condition=Q(state__in=["pending", "planned", "running", "settling", "done", "failed", "cancelled"]),
                name="jobs_state_valid",
            ),
        ]
        indexes = [models.Index(fields=["state"], name="jobs_state")]

    def __str__(self) -> str:
        return f"job #{self.pk} ({self.kind}, {self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


TERMINAL_STATES = frozenset({Job.State.DONE, Job.State.FAILED, Job.State.CANCELLED})


class JobTransition(models.Model):
    """Every state a job entered, when, why and on whose behalf (the audit trail)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="transitions")
    from_state = models.CharField(max_length=16, blank=True, help_text="empty for the creation")
    to_state = models.CharField(max_length=16)
    reason = models.CharField(max_length=200, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="empty when the system (scheduler) acted",
    )
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]


class Plan(models.Model):
    """One version of a job's plan: segments covering all blocks. Re-planning (after a
    provider left, say) adds a version; the newest one is current."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="plans")
    version = models.PositiveIntegerField()
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job_id", "-version"]
        constraints = [models.UniqueConstraint(fields=["job", "version"], name="jobs_plan_version_unique")]


class PlanSegment(models.Model):
    """Blocks [block_start, block_end) served by ``provider`` at ``price`` (fixed when planned)."""

    plan = models.ForeignKey(Plan, on_delete=models.CASCADE, related_name="segments")
    index = models.PositiveIntegerField()
    block_start = models.PositiveIntegerField()
    block_end = models.PositiveIntegerField()
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="+")
    price = models.BigIntegerField(help_text="micro-credits per million work units")

    class Meta:
        ordering = ["plan_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["plan", "index"], name="jobs_segment_index_unique"),
            models.CheckConstraint(condition=Q(block_start__lt=F("block_end")), name="jobs_segment_nonempty"),
            models.CheckConstraint(condition=Q(price__gte=0), name="jobs_segment_price_non_negative"),
        ]


class PlanBackup(models.Model):
    """A ranked backup for a segment (rank 0 is tried first), at its own price."""

    segment = models.ForeignKey(PlanSegment, on_delete=models.CASCADE, related_name="backups")
    rank = models.PositiveIntegerField()
    provider = models.ForeignKey("providers.Provider", on_delete=models.PROTECT, related_name="+")
    price = models.BigIntegerField()

    class Meta:
        ordering = ["segment_id", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["segment", "rank"], name="jobs_backup_rank_unique"),
            models.UniqueConstraint(fields=["segment", "provider"], name="jobs_backup_provider_unique"),
        ]
