from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from marketplace.catalog.models import BlockDigest, CatalogModel
from marketplace.catalog.services import catalog_model_set_active


class BlockDigestInline(admin.TabularInline):
    model = BlockDigest
    extra = 0
    ordering = ["index"]


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    list_display = ["model_id", "name", "arch", "num_blocks", "hidden_size", "dtype", "active"]
    list_filter = ["active", "arch", "dtype"]
    search_fields = ["model_id", "name"]
    inlines = [BlockDigestInline]
    actions = ["withdraw", "reinstate"]

    @admin.action(description="Withdraw selected models")
    def withdraw(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for model in queryset:
            catalog_model_set_active(model=model, active=False)

    @admin.action(description="Return selected models to the marketplace")
    def reinstate(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for model in queryset:
            catalog_model_set_active(model=model, active=True)


@admin.register(BlockDigest)
class BlockDigestAdmin(admin.ModelAdmin):
    list_display = ["model", "index", "digest"]
    search_fields = ["model__model_id", "digest"]
