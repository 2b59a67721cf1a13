from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.http import HttpRequest

from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.services import api_key_create, api_key_revoke

admin.site.register(User, UserAdmin)


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["user", "name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "user", "name", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "user__username", "name"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, **kwargs):  # noqa: ANN003,ANN201
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        return ["user", "name"] if obj is None else ["user", "name", *self.readonly_fields]

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:  # noqa: ANN001
        if change:
            obj.save(update_fields=["name"])
            return
        created = api_key_create(user=obj.user, name=obj.name)
        # The admin hands its object on (log entry, redirect); make it the key just created.
        obj.pk, obj.prefix, obj.created_at = created.key.pk, created.key.prefix, created.key.created_at
        obj._state.adding = False
        self.message_user(
            request, f"API key for {obj.user}: {created.raw} (copy it now; it is not shown again)", messages.WARNING
        )

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: the row records who had access

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for key in queryset:
            api_key_revoke(key=key, by=request.user)
