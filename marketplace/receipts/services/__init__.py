"""Writes for settlement, one module per idea (docs/protocol.md, "Payment channel" and
"Tickets and receipts: formats, signing, settlement, audits"):

- ``pricing``: what a ticket's work costs and what of it is payable (shared arithmetic);
- ``tickets``: issuing and renewing a plan's signed tickets, and probe tickets;
- ``uploads``: checking and storing providers' receipts (and the upload hook);
- ``settlement``: paying receipts from the job's hold, closing settled jobs;
- ``finishing``: the client's last receipts, then settling;
- ``disputes``: a client's refused receipts, and staff's verdicts on them;
- ``audits``: recomputation and equivocation audits, their deposits and verdicts;
- ``offences``: what a proven cheat costs a provider (reputation, suspension, clawback).

The modules import one another one way only (pricing <- tickets, settlement <- disputes;
offences <- audits, disputes; uploads <- finishing). Code in this repository imports the
module it needs; this package re-exports the public names so that
``from marketplace.receipts.services import receipts_settle`` keeps working for scripts and
tests. Module-level state (the upload and audit hook registries) lives in one module each
(``uploads``, ``audits``), so every import path sees the same registry.
"""

from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD
from marketplace.receipts.services.audits import (
    MAX_AUDIT_TENSOR_BYTES,
    audit_create,
    audit_created_hook_register,
    audit_equivocation_create,
    audit_verdict_record,
    framed_tensor_digest,
)
from marketplace.receipts.services.disputes import DISPUTE_CODES, dispute_verdict_record, receipt_dispute
from marketplace.receipts.services.finishing import job_finish
from marketplace.receipts.services.offences import provider_job_void, provider_offence_record
from marketplace.receipts.services.pricing import PAYABLE_STATES, payable_units, ticket_cost, ticket_fee
from marketplace.receipts.services.settlement import (
    SettleSummary,
    job_settle_before_closing,
    jobs_close_settled,
    receipt_group_settle,
    receipts_settle,
)
from marketplace.receipts.services.tickets import (
    NO_CLIENT_KEY,
    PROBE_JOB_ID,
    ticket_issue_for_probe,
    tickets_issue_for_plan,
    tickets_renew,
)
from marketplace.receipts.services.uploads import ReceiptOutcome, receipts_upload, receipts_uploaded_hook_register

__all__ = [
    "MAX_RECEIPTS_PER_UPLOAD",
    "NO_CLIENT_KEY",
    "PAYABLE_STATES",
    "PROBE_JOB_ID",
    "ReceiptOutcome",
    "SettleSummary",
    "ticket_cost",
    "ticket_fee",
    "payable_units",
    "ticket_issue_for_probe",
    "tickets_issue_for_plan",
    "tickets_renew",
    "receipts_upload",
    "receipts_uploaded_hook_register",
    "receipts_settle",
    "receipt_group_settle",
    "jobs_close_settled",
    "job_settle_before_closing",
    "job_finish",
    "receipt_dispute",
    "dispute_verdict_record",
    "DISPUTE_CODES",
    "audit_create",
    "audit_equivocation_create",
    "audit_created_hook_register",
    "audit_verdict_record",
    "framed_tensor_digest",
    "MAX_AUDIT_TENSOR_BYTES",
    "provider_offence_record",
    "provider_job_void",
]
