"""Read-only admin views: tickets, receipts, settlements, audits and offences are written by
services only (settlement and audits must stay consistent with the ledger)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from marketplace.receipts.models import Audit, Dispute, Offence, Receipt, Settlement, Ticket


class ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Ticket)
class TicketAdmin(ReadOnly):
    list_display = [
        "ticket_id",
        "job",
        "segment",
        "role",
        "rank",
        "provider",
        "price",
        "max_units",
        "credit_units",
        "spend_cap",
        "settled_units",
        "acked_units",
        "settled_amount",
        "expires_at",
        "disputed_at",
        "voided_at",
    ]
    list_filter = ["role"]
    search_fields = ["ticket_id", "provider__peer_id"]


@admin.register(Receipt)
class ReceiptAdmin(ReadOnly):
    list_display = ["ticket", "session_id", "seq", "units", "acked_units", "settled_units", "updated_at"]
    search_fields = ["ticket__ticket_id", "session_id"]


@admin.register(Settlement)
class SettlementAdmin(ReadOnly):
    list_display = ["id", "job", "provider", "units", "amount", "shortfall", "created_at"]


@admin.register(Audit)
class AuditAdmin(ReadOnly):
    list_display = [
        "id",
        "job",
        "provider",
        "reference_provider",
        "block_start",
        "block_end",
        "state",
        "verdict",
        "created_at",
        "decided_at",
    ]
    list_filter = ["state", "verdict"]
    exclude = ["inputs", "claimed", "reference"]


@admin.register(Offence)
class OffenceAdmin(ReadOnly):
    list_display = ["id", "provider", "kind", "job", "audit", "at"]
    list_filter = ["kind"]


@admin.register(Dispute)
class DisputeAdmin(ReadOnly):
    """Decided through ``POST /api/disputes/<id>/verdict/`` (staff), which keeps the ledger consistent."""

    list_display = [
        "id",
        "job",
        "provider",
        "ticket",
        "session_id",
        "seq",
        "units",
        "code",
        "state",
        "verdict",
        "created_at",
        "decided_at",
    ]
    list_filter = ["state", "verdict", "code"]
