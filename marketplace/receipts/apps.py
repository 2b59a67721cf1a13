from django.apps import AppConfig


class ReceiptsConfig(AppConfig):
    name = "marketplace.receipts"
    label = "receipts"
    verbose_name = "Tickets, receipts and audits"

    def ready(self) -> None:
        from marketplace.jobs.services import job_closing_hook_register, plan_stored_hook_register
        from marketplace.receipts.services.settlement import job_settle_before_closing
        from marketplace.receipts.services.tickets import tickets_issue_for_plan

        plan_stored_hook_register(tickets_issue_for_plan)
        job_closing_hook_register(job_settle_before_closing)
