"""Top-ups and payout requests in the admin: visible, never edited by hand. Payout requests
are decided with the actions below (or on the staff page /staff/payouts/), which call the
same services as the API."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from marketplace.common.admin import ReadOnlyAdmin
from marketplace.common.errors import ApplicationError
from marketplace.payments.models import PaymentEvent, PayoutRequest, TopUp
from marketplace.payments.services import payout_approve, payout_reject


@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    list_display = ["id", "user", "provider", "state", "credits", "amount_minor", "currency", "created_at", "paid_at"]
    list_filter = ["state", "provider"]
    search_fields = ["user__username", "external_id"]


@admin.register(PaymentEvent)
class PaymentEventAdmin(ReadOnlyAdmin):
    list_display = ["id", "provider", "event_id", "type", "topup", "outcome", "received_at"]
    list_filter = ["provider", "outcome"]


@admin.register(PayoutRequest)
class PayoutRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "user", "provider", "amount", "state", "note", "created_at", "decided_by", "decided_at"]
    list_filter = ["state"]
    search_fields = ["user__username"]
    actions = ["approve", "reject"]

    def _each(self, request: HttpRequest, queryset: QuerySet[PayoutRequest], decide: object, verb: str) -> None:
        done = 0
        for payout in queryset:
            try:
                decide(request_id=payout.pk, by=request.user, note=f"{verb} in the admin")  # type: ignore[operator]
                done += 1
            except ApplicationError as e:
                self.message_user(request, f"#{payout.pk}: {e.message}", messages.ERROR)
        self.message_user(request, f"{verb} {done} payout request(s)")

    @admin.action(description="Approve selected payout requests (pay the held credits out)")
    def approve(self, request: HttpRequest, queryset: QuerySet[PayoutRequest]) -> None:
        self._each(request, queryset, payout_approve, "approved")

    @admin.action(description="Reject selected payout requests (return the held credits)")
    def reject(self, request: HttpRequest, queryset: QuerySet[PayoutRequest]) -> None:
        self._each(request, queryset, payout_reject, "rejected")
