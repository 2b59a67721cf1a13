"""Audits: the platform validator recomputes a disputed span and records the verdict."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

_validators: dict[str, object] = {}


def validator_references() -> object:
    """The platform validator's reference checkpoints (``scheduler.probing.References`` over
    ``HIVEMART_MODELS_DIR``), kept per process so that a worker loads each model once."""
    from scheduler.probing import References

    key = str(settings.HIVEMART_MODELS_DIR)
    if key not in _validators:
        _validators[key] = References(settings.HIVEMART_MODELS_DIR)
    return _validators[key]


def audit_decide(*, audit_id: int, references: object | None = None) -> dict[str, object]:
    """Recompute an open audit's span with the platform validator and record the verdict
    (``scheduler.audit``); a decided audit is left alone. Without a checkpoint for the model
    the verdict is ``inconclusive`` (the validator cannot tell)."""
    from marketplace.receipts.models import Audit
    from marketplace.receipts.services.audits import audit_verdict_record
    from scheduler.audit import Verdict, audit_span
    from scheduler.probing import ReferenceUnavailable

    audit = Audit.objects.select_related("job__model").filter(pk=audit_id).first()
    if audit is None or audit.state != Audit.State.OPEN:
        return {"audit": audit_id, "verdict": audit.verdict if audit else None, "decided": False}
    model = audit.job.model
    validator_failed = False
    try:
        computer = (references or validator_references()).get(model.model_id)  # type: ignore[attr-defined]
    except ReferenceUnavailable as e:
        # Not the reporter's fault: its deposit comes back.
        verdict, validator_failed = Verdict("inconclusive", f"no validator checkpoint: {e}"), True
    else:
        verdict = audit_span(
            computer,
            start=audit.block_start,
            end=audit.block_end,
            dtype=audit.dtype,
            hidden_size=model.hidden_size,
            inputs=bytes(audit.inputs),
            claimed=bytes(audit.claimed),
            reference=bytes(audit.reference),
        )
    audit = audit_verdict_record(
        audit_id=audit_id, verdict=verdict.verdict, detail=verdict.detail, validator_failed=validator_failed
    )
    return {"audit": audit_id, "verdict": audit.verdict, "decided": True}


def audits_open(*, older_than_s: float, now: datetime | None = None) -> list[int]:
    """Open audits filed more than ``older_than_s`` ago (their message may have been lost)."""
    from marketplace.receipts.models import Audit

    cutoff = (now or timezone.now()) - timedelta(seconds=older_than_s)
    return list(
        Audit.objects.filter(state=Audit.State.OPEN, created_at__lt=cutoff).order_by("pk").values_list("pk", flat=True)
    )
