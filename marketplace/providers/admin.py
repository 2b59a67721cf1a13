from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest

from marketplace.common.admin import ReadOnlyAdmin
from marketplace.providers.models import Provider, ProviderEvent, ProviderMeasurement, RegistrationChallenge
from marketplace.providers.services import provider_reinstate, provider_suspend, providers_mark_stale


class ProviderEventInline(admin.TabularInline):
    model = ProviderEvent
    extra = 0
    can_delete = False
    readonly_fields = ["kind", "from_state", "to_state", "reason", "at"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "peer_id",
        "user",
        "model",
        "block_start",
        "block_end",
        "price",
        "state",
        "last_heartbeat_at",
        "suspended_at",
    ]
    list_filter = ["state", "model", "region", ("suspended_at", admin.EmptyFieldListFilter)]
    search_fields = ["peer_id", "name", "user__username"]
    # Identity and money stay as registration made them; staff may fix descriptive fields.
    readonly_fields = [
        "user",
        "peer_id",
        "public_key",
        "earnings_account",
        "state",
        "last_heartbeat_at",
        "reported_throughput",
        "reported_latency_ms",
        "latest_measurement",
        "suspended_at",
        "suspension_reason",
        "registered_at",
        "updated_at",
    ]
    inlines = [ProviderEventInline]
    actions = ["suspend", "reinstate", "mark_stale"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # providers register themselves by signing a challenge

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.action(description="Suspend selected providers")
    def suspend(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for provider in queryset:
            provider_suspend(provider=provider, reason=f"suspended by {request.user}")

    @admin.action(description="Reinstate selected providers")
    def reinstate(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for provider in queryset:
            provider_reinstate(provider=provider, reason=f"reinstated by {request.user}")

    @admin.action(description="Mark every provider with missed heartbeats offline")
    def mark_stale(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        self.message_user(request, f"{providers_mark_stale()} provider(s) marked offline", messages.INFO)


@admin.register(ProviderMeasurement)
class ProviderMeasurementAdmin(ReadOnlyAdmin):
    list_display = ["provider", "throughput", "latency_ms", "success_rate", "samples", "measured_at"]
    list_filter = ["provider"]


@admin.register(ProviderEvent)
class ProviderEventAdmin(ReadOnlyAdmin):
    list_display = ["provider", "kind", "from_state", "to_state", "reason", "at"]
    list_filter = ["kind"]


@admin.register(RegistrationChallenge)
class RegistrationChallengeAdmin(ReadOnlyAdmin):
    list_display = ["user", "nonce", "created_at", "expires_at", "used_at"]
