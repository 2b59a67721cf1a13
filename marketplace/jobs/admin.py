from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from marketplace.common.admin import ReadOnlyAdmin
from marketplace.jobs.models import Job, JobTransition, Plan, PlanBackup, PlanSegment
from marketplace.jobs.services import job_cancel


class TransitionInline(admin.TabularInline):
    model = JobTransition
    extra = 0
    can_delete = False
    readonly_fields = ["from_state", "to_state", "reason", "actor", "at"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    """Jobs change only through their services (state machine, hold); the admin shows them and can cancel."""

    list_display = ["id", "user", "kind", "model", "state", "budget", "max_price", "created_at"]
    list_filter = ["state", "kind", "model"]
    search_fields = ["user__username", "idempotency_key"]
    inlines = [TransitionInline]
    actions = ["cancel"]

    @admin.action(description="Cancel selected jobs (releases their holds)")
    def cancel(self, request: HttpRequest, queryset) -> None:  # noqa: ANN001
        for job in queryset.exclude(state__in=["done", "failed", "cancelled", "settling"]):
            job_cancel(job=job, by=request.user, reason=f"cancelled by {request.user} in the admin")


@admin.register(JobTransition)
class JobTransitionAdmin(ReadOnlyAdmin):
    list_display = ["job", "from_state", "to_state", "reason", "actor", "at"]
    list_filter = ["to_state"]


class SegmentInline(admin.TabularInline):
    model = PlanSegment
    extra = 0
    can_delete = False
    readonly_fields = ["index", "block_start", "block_end", "provider", "price"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Plan)
class PlanAdmin(ReadOnlyAdmin):
    list_display = ["job", "version", "reason", "created_at"]
    inlines = [SegmentInline]


@admin.register(PlanSegment)
class PlanSegmentAdmin(ReadOnlyAdmin):
    list_display = ["plan", "index", "block_start", "block_end", "provider", "price"]


@admin.register(PlanBackup)
class PlanBackupAdmin(ReadOnlyAdmin):
    list_display = ["segment", "rank", "provider", "price"]
