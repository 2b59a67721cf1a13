"""Providers: who serves which blocks of which model, at what price, and how well.

A provider is one agent process with one Ed25519 key, which is also its libp2p identity
(``peer_id``). Its offer (model, block span, price) and hardware come from registration;
heartbeats bring its state and *self-reported* figures; the scheduler's probes bring
*measured* figures, kept apart in :class:`ProviderMeasurement`. Once a measurement exists,
matching and money use it and ignore what the provider says about itself.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Provider(models.Model):
    class State(models.TextChoices):
        JOINING = "joining", "joining (loading blocks)"
        ONLINE = "online"
        DRAINING = "draining", "draining (finishing sessions, taking no new ones)"
        OFFLINE = "offline"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="providers")
    peer_id = models.CharField(max_length=128, unique=True)
    public_key = models.CharField(max_length=64, help_text="raw Ed25519 public key, hex")
    name = models.CharField(max_length=100, blank=True)
    gpu = models.CharField(max_length=100, blank=True, help_text='e.g. "NVIDIA GeForce RTX 4090", or "cpu"')
    gpu_memory_mb = models.PositiveIntegerField(default=0)
    region = models.CharField(max_length=32, blank=True)

    model = models.ForeignKey("catalog.CatalogModel", on_delete=models.PROTECT, related_name="providers")
    block_start = models.PositiveIntegerField()
    block_end = models.PositiveIntegerField(help_text="exclusive")
    price = models.BigIntegerField(help_text="micro-credits per million work units")

    state = models.CharField(max_length=16, choices=State.choices, default=State.JOINING)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    reported_throughput = models.FloatField(null=True, blank=True, help_text="self-reported work units per second")
    reported_latency_ms = models.FloatField(null=True, blank=True, help_text="self-reported")
    latest_measurement = models.ForeignKey(
        "ProviderMeasurement", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    suspended_at = models.DateTimeField(null=True, blank=True)
    suspension_reason = models.CharField(max_length=200, blank=True)
    # 0..100: starts at 100 and falls with every offence (a failed audit, a wrong probe
    # answer); see marketplace.receipts.services.offences.provider_offence_record.
    reputation = models.PositiveSmallIntegerField(default=100)

    earnings_account = models.OneToOneField("ledger.Account", on_delete=models.PROTECT, related_name="provider")
    registered_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=Q(block_start__lt=models.F("block_end")), name="providers_span_nonempty"),
            models.CheckConstraint(condition=Q(price__gte=0), name="providers_price_non_negative"),
            models.CheckConstraint(
                condition=Q(state__in=["joining", "online", "draining", "offline"]), name="providers_state_valid"
            ),
        ]
        indexes = [models.Index(fields=["model", "state"], name="providers_model_state")]

    def __str__(self) -> str:
        return f"{self.name or self.peer_id[:16]} ({self.model_id}:{self.block_start}-{self.block_end})"

    @property
    def is_suspended(self) -> bool:
        return self.suspended_at is not None


class ProviderMeasurement(models.Model):
    """Figures the scheduler measured by probing the provider (never self-reported)."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="measurements")
    throughput = models.FloatField(help_text="work units per second")
    latency_ms = models.FloatField()
    success_rate = models.FloatField(help_text="fraction of probes answered correctly, 0..1")
    samples = models.PositiveIntegerField(default=1)
    measured_at = models.DateTimeField()
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-measured_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(success_rate__gte=0) & Q(success_rate__lte=1), name="providers_success_rate_fraction"
            ),
            models.CheckConstraint(
                condition=Q(throughput__gte=0) & Q(latency_ms__gte=0), name="providers_measurement_non_negative"
            ),
        ]


class ProviderEvent(models.Model):
    """The audit trail of a provider: registrations, state changes, suspensions."""

    class Kind(models.TextChoices):
        REGISTERED = "registered"
        REREGISTERED = "reregistered"
        STATE = "state"
        OFFER = "offer"
        SUSPENDED = "suspended"
        REINSTATED = "reinstated"

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, blank=True)
    reason = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField()

    class Meta:
        ordering = ["-at", "-id"]


class RegistrationChallenge(models.Model):
    """A single-use random nonce a provider signs to prove it holds its key (see services)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    nonce = models.CharField(max_length=64, unique=True, help_text="32 random bytes, hex")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
