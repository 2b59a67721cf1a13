from django.apps import AppConfig
from django.conf import settings


def _match_on_create(job_id: int) -> None:
    # Read at call time, so a test (or an operator's setting) can turn it off.
    if settings.HIVEMART_MATCH_ON_CREATE:
        from scheduler.tasks import job_match_enqueue

        job_match_enqueue(job_id)


def _settle_on_upload(job_ids: list[int]) -> None:
    if settings.HIVEMART_SETTLE_ON_UPLOAD:
        from scheduler.tasks import receipts_settle_enqueue

        receipts_settle_enqueue(job_ids)


def _decide_on_audit(audit_id: int) -> None:
    if settings.HIVEMART_SETTLE_ON_UPLOAD:
        from scheduler.tasks import audit_decide_enqueue

        audit_decide_enqueue(audit_id)


class SchedulingConfig(AppConfig):
    name = "scheduler.app"
    label = "scheduling"
    verbose_name = "Scheduling"

    def ready(self) -> None:
        from marketplace.jobs.services import job_created_hook_register
        from marketplace.receipts.services.audits import audit_created_hook_register
        from marketplace.receipts.services.uploads import receipts_uploaded_hook_register
        from marketplace.web.health import health_check_register
        from scheduler.app.health import broker_check

        job_created_hook_register(_match_on_create)
        receipts_uploaded_hook_register(_settle_on_upload)
        audit_created_hook_register(_decide_on_audit)
        health_check_register(broker_check)
