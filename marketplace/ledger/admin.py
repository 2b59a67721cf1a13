"""The ledger in the admin: everything visible, nothing editable. Credits move only through
the services (grants: ``hivemart-market grant_credits`` or ``POST /api/ledger/grants/``)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from marketplace.common.admin import ReadOnlyAdmin
from marketplace.ledger.models import Account, Hold, Posting, Transaction
from marketplace.ledger.services import hold_release


class PostingInline(admin.TabularInline):
    model = Posting
    extra = 0
    can_delete = False
    readonly_fields = ["account", "amount"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "user", "label", "balance", "created_at"]
    list_filter = ["kind"]
    search_fields = ["user__username", "label"]


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "memo", "idempotency_key", "hold", "created_by", "created_at"]
    list_filter = ["kind"]
    search_fields = ["idempotency_key", "memo"]
    inlines = [PostingInline]


@admin.register(Posting)
class PostingAdmin(ReadOnlyAdmin):
    list_display = ["id", "transaction", "account", "amount"]
    list_filter = ["account__kind"]


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["id", "payer", "amount", "state", "memo", "created_at", "closed_at"]
    list_filter = ["state"]
    actions = ["release"]

    @admin.action(description="Release selected holds (return what is left to the payer)")
    def release(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for hold in queryset:
            hold_release(hold=hold, memo=f"released by {request.user} in the admin")
