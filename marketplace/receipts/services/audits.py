"""Audits: a client's claim that a provider's output differs from a backup's on the same
inputs (decided by the scheduler's recomputation), or that it signed two different outputs
for one step (decided at once); their evidence, deposits and verdicts. A verdict against
the provider voids its work on the job and records an offence (``offences``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any

import msgpack
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from hivemart_core.protocol.commitments import StepRecord, StepRecordError, equivocation
from hivemart_core.protocol.receipts import (
    SESSION_ID_PATTERN,
    ReceiptError,
    chain_next,
    chain_start,
    verify_receipt,
)
from hivemart_core.protocol.tickets import JobTicket, TicketError
from marketplace.accounts.models import User
from marketplace.common.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from marketplace.jobs.models import Job
from marketplace.ledger.services import (
    MAX_AMOUNT,
    hold_forfeit,
    hold_place,
    hold_release,
    wallet_get_or_create,
)
from marketplace.providers.models import Provider
from marketplace.receipts.models import Audit, Offence, Ticket
from marketplace.receipts.services.offences import provider_job_void, provider_offence_record

logger = logging.getLogger(__name__)

MAX_AUDIT_TENSOR_BYTES = 8 * 1024 * 1024
AUDIT_DTYPES = ("float32", "float16", "bfloat16")
# Audits cost the validator real compute; a job may have this many waiting at once.
MAX_OPEN_AUDITS_PER_JOB = 16

_audit_hooks: list[Callable[[int], None]] = []


def audit_created_hook_register(hook: Callable[[int], None]) -> None:
    """Call ``hook(audit_id)`` inside the transaction that files an audit (the scheduling
    app queues ``audit_decide`` on commit)."""
    if hook not in _audit_hooks:
        _audit_hooks.append(hook)


def _check_tensor_blob(name: str, blob: bytes) -> None:
    if not isinstance(blob, (bytes, bytearray)) or not 0 < len(blob) <= MAX_AUDIT_TENSOR_BYTES:
        raise ValidationFailed(
            f"{name} is an encoded tensor message of 1 byte to {MAX_AUDIT_TENSOR_BYTES} bytes", extra={"field": name}
        )


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_EVIDENCE_STEPS = 65_536
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def framed_tensor_digest(blob: bytes) -> bytes:
    """``tensor_digest`` of the one tensor in an ``encode_message({}, [tensor])`` byte string,
    computed from the frames without torch (the web process does not load it)."""

    def frame(offset: int) -> tuple[bytes, int]:
        if offset + 8 > len(blob):
            raise ValueError("truncated frame")
        length = int.from_bytes(blob[offset : offset + 8], "big")
        if offset + 8 + length > len(blob):
            raise ValueError("truncated frame")
        return blob[offset + 8 : offset + 8 + length], offset + 8 + length

    head, offset = frame(0)
    decoded = msgpack.unpackb(head, raw=False, strict_map_key=True)
    descriptors = decoded.get("t") if isinstance(decoded, dict) else None
    if not (
        isinstance(descriptors, list)
        and len(descriptors) == 1
        and isinstance(descriptors[0], list)
        and len(descriptors[0]) == 2
        and descriptors[0][0] in _ITEMSIZE
        and isinstance(descriptors[0][1], list)
        and all(type(d) is int and 0 <= d < 2**31 for d in descriptors[0][1])
    ):
        raise ValueError("expected one floating-point tensor")
    dtype, shape = descriptors[0]
    numel = 1
    for d in shape:
        numel *= d
    digest = hashlib.sha256(f"{dtype}:{','.join(map(str, shape))}\n".encode())
    remaining = numel * _ITEMSIZE[dtype]
    while remaining > 0:
        chunk, offset = frame(offset)
        if not chunk or len(chunk) > remaining:
            raise ValueError("tensor frames do not match the tensor's size")
        digest.update(chunk)
        remaining -= len(chunk)
    if offset != len(blob):
        raise ValueError("trailing bytes")
    return digest.digest()


def _check_evidence(evidence: Any, ticket: Ticket, session_id: str, claimed: bytes) -> None:
    """The claimed output is step ``step`` of a session whose provider-signed receipt commits,
    through its hash chain, to the client's ``digests`` of every output. Raises ValidationFailed."""

    def bad(message: str) -> ValidationFailed:
        return ValidationFailed(f"evidence: {message}", extra={"field": "evidence"}, code="bad_evidence")

    if not isinstance(evidence, dict) or set(evidence) != {"receipt", "digests", "step"}:
        raise bad("a map of receipt, digests and step")
    try:
        receipt = verify_receipt(evidence["receipt"], JobTicket.from_dict(ticket.signed))
    except (ReceiptError, TicketError) as e:
        raise bad(f"the receipt does not verify: {e}") from None
    digests, step = evidence["digests"], evidence["step"]
    if receipt.session_id != session_id:
        raise bad("the receipt is for another session")
    if not (
        isinstance(digests, list)
        and len(digests) == receipt.steps <= MAX_EVIDENCE_STEPS
        and all(isinstance(d, str) and _HEX64.match(d) for d in digests)
    ):
        raise bad(f"digests must be the receipt's {receipt.steps} output digests (hex sha256)")
    if type(step) is not int or not 0 <= step < len(digests):
        raise bad("step must index the digests")
    chain = chain_start(ticket.ticket_id, session_id)
    for d in digests:
        chain = chain_next(chain, bytes.fromhex(d))
    if chain.hex() != receipt.chain:
        raise bad("the digests do not reproduce the receipt's hash chain")
    try:
        claimed_digest = framed_tensor_digest(claimed)
    except (ValueError, msgpack.UnpackException) as e:
        raise bad(f"claimed is not an encoded tensor: {e}") from None
    if claimed_digest.hex() != digests[step]:
        raise bad(f"claimed is not the output of step {step}")


def _check_deposit(deposit: Any, *, proven: bool) -> None:
    """An audit proves what it claims (evidence) or puts credits at stake (a deposit)."""
    if type(deposit) is not int or not 0 <= deposit <= MAX_AMOUNT:
        raise ValidationFailed(
            f"deposit is an integer number of micro-credits, 0 to {MAX_AMOUNT}", extra={"field": "deposit"}
        )
    if proven:
        return
    if settings.HIVEMART_AUDIT_REQUIRE_EVIDENCE:
        raise ValidationFailed(
            "this marketplace requires evidence that the provider signed for the claimed output",
            extra={"field": "evidence"},
            code="evidence_required",
        )
    minimum = settings.HIVEMART_AUDIT_DEPOSIT
    if deposit < minimum:
        raise ValidationFailed(
            f"an audit without evidence needs a deposit of at least {minimum} micro-credits (returned if the "
            f"provider is found cheating, forfeited if the audit proves nothing); send evidence (the provider's "
            f"receipt and your output digests) or a deposit",
            extra={"field": "deposit", "minimum": minimum},
            code="evidence_or_deposit_required",
        )


def _check_audit_quota(user: User, size: int) -> None:
    """The reporter's stored audit tensors, over all its jobs, stay within HIVEMART_AUDIT_QUOTA_BYTES.
    Locks the user's row so that two audits filed at once cannot both fit in the last space."""
    User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
    used = sum(Audit.objects.filter(reporter=user, stored_bytes__gt=0).values_list("stored_bytes", flat=True))
    quota = settings.HIVEMART_AUDIT_QUOTA_BYTES
    if used + size > quota:
        raise Conflict(
            f"your open audits already store {used} bytes of tensors and this one needs {size}; the limit "
            f"is {quota} bytes per user. Wait for their verdicts (tensors are dropped once an audit is "
            f"decided) or send smaller tensors",
            extra={"used": used, "needed": size, "quota": quota},
            code="audit_quota_exceeded",
        )


@transaction.atomic
def audit_create(
    *,
    user: User,
    job: Job,
    ticket_id: str,
    session_id: str,
    start: int,
    end: int,
    dtype: str,
    inputs: bytes,
    claimed: bytes,
    reference: bytes,
    reference_peer: str,
    evidence: dict[str, Any] | None = None,
    deposit: int = 0,
) -> Audit:
    """File an audit: the output of ticket ``ticket_id``'s provider for blocks [start, end)
    (``claimed``) differed from the backup ``reference_peer``'s (``reference``) on the same
    ``inputs``. The job's owner (or staff) files it; the scheduler's ``audit_decide``
    recomputes the span and decides. Tensors are ``encode_message({}, [tensor])`` bytes.

    An audit costs the platform a recomputation and stores up to three tensors, so it needs
    ``evidence`` (``{"receipt", "digests", "step"}``: proof that ``claimed`` is an output the
    provider signed for) or a ``deposit`` of at least ``HIVEMART_AUDIT_DEPOSIT`` micro-credits,
    held from the reporter's wallet until the verdict: returned if the provider cheated,
    forfeited to the platform otherwise. ``HIVEMART_AUDIT_REQUIRE_EVIDENCE`` refuses audits
    without evidence. The reporter's stored tensors count against ``HIVEMART_AUDIT_QUOTA_BYTES``."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's owner may file an audit for it")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=ticket_id).first()
    if ticket is None:
        raise NotFound(f"job #{job.pk} has no ticket {ticket_id}", extra={"field": "ticket_id"})
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.match(session_id):
        raise ValidationFailed("session_id is 8 to 64 characters of [A-Za-z0-9_-]", extra={"field": "session_id"})
    if not (isinstance(start, int) and isinstance(end, int) and ticket.block_start <= start < end <= ticket.block_end):
        raise ValidationFailed(
            f"blocks {start}:{end} are outside the ticket's {ticket.block_start}:{ticket.block_end}",
            extra={"field": "start"},
        )
    if dtype not in AUDIT_DTYPES:
        raise ValidationFailed(f"dtype is one of {', '.join(AUDIT_DTYPES)}", extra={"field": "dtype"})
    for name, blob in (("inputs", inputs), ("claimed", claimed), ("reference", reference)):
        _check_tensor_blob(name, blob)
    backup = (
        Provider.objects.filter(
            peer_id=reference_peer, tickets__job=job, tickets__block_start__lte=start, tickets__block_end__gte=end
        )
        .exclude(pk=ticket.provider_id)
        .first()
    )
    if backup is None:
        raise ValidationFailed(
            f"{reference_peer} holds no ticket of job #{job.pk} for blocks {start}:{end}",
            extra={"field": "reference_peer"},
            code="bad_reference",
        )
    if evidence is not None:
        _check_evidence(evidence, ticket, session_id, bytes(claimed))
    _check_deposit(deposit, proven=evidence is not None)
    if Audit.objects.filter(job=job, state=Audit.State.OPEN).count() >= MAX_OPEN_AUDITS_PER_JOB:
        raise Conflict(
            f"job #{job.pk} already has {MAX_OPEN_AUDITS_PER_JOB} audits waiting for a verdict", code="too_many_audits"
        )
    size = len(inputs) + len(claimed) + len(reference)
    _check_audit_quota(user, size)
    hold = None
    if deposit:
        # InsufficientCredits (402) when the wallet cannot cover it; nothing is stored then.
        hold = hold_place(
            account=wallet_get_or_create(user=user), amount=deposit, memo=f"deposit of an audit of job #{job.pk}"
        )
    audit = Audit.objects.create(
        job=job,
        reporter=user,
        ticket=ticket,
        provider=ticket.provider,
        reference_provider=backup,
        session_id=session_id,
        block_start=start,
        block_end=end,
        dtype=dtype,
        inputs=bytes(inputs),
        claimed=bytes(claimed),
        reference=bytes(reference),
        claimed_proven=evidence is not None,
        deposit=deposit,
        deposit_hold=hold,
        stored_bytes=size,
        deposit_state=Audit.DepositState.HELD if hold else Audit.DepositState.NONE,
    )
    for hook in _audit_hooks:
        hook(audit.pk)
    return audit


@transaction.atomic
def audit_equivocation_create(*, user: User, job: Job, ticket_id: str, records: Any) -> Audit:
    """File and decide at once an audit whose evidence is two step records
    (``hivemart_core.protocol.commitments``) that the provider of ``ticket_id`` signed for one step
    of a session on that ticket and that differ: it pushed the next provider another output than
    it returned to the client. Signatures decide it, no recomputation: the verdict is
    ``provider_cheated``, with what that entails (its work on the job voided, an offence)."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's owner may file an audit for it")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=ticket_id).first()
    if ticket is None:
        raise NotFound(f"job #{job.pk} has no ticket {ticket_id}", extra={"field": "ticket_id"})
    if not isinstance(records, list) or len(records) != 2:
        raise ValidationFailed("records are the provider's two step records of one step", extra={"field": "records"})
    try:
        returned, pushed = (StepRecord.from_dict(r) for r in records)
    except StepRecordError as e:
        raise ValidationFailed(f"records: {e}", extra={"field": "records"}, code="bad_evidence") from None
    if returned.peer != ticket.provider.peer_id or returned.ticket_id != ticket.ticket_id:
        raise ValidationFailed(
            f"the records must be signed by {ticket.provider.peer_id} for ticket {ticket_id}",
            extra={"field": "records"},
            code="bad_evidence",
        )
    if not equivocation(returned, pushed):
        raise ValidationFailed(
            "the records do not prove anything: they must both verify and differ for one (session, ticket, step)",
            extra={"field": "records"},
            code="bad_evidence",
        )
    audit = Audit.objects.create(
        job=job,
        reporter=user,
        ticket=ticket,
        provider=ticket.provider,
        session_id=returned.session_id,
        block_start=ticket.block_start,
        block_end=ticket.block_end,
        dtype="",
        inputs=b"",
        claimed=b"",
        reference=b"",
        claimed_proven=True,
    )
    return audit_verdict_record(
        audit_id=audit.pk,
        verdict=Audit.Verdict.PROVIDER_CHEATED,
        detail=f"equivocation: step {returned.step_id} of session {returned.session_id} signed with output "
        f"{returned.output_digest} and with output {pushed.output_digest}",
    )


def _audit_deposit_settle(audit: Audit, *, proved: bool) -> None:
    """Return the audit's deposit to the reporter when it proved something, else forfeit it to
    the platform; and drop its tensors (the verdict is recorded, the quota space is freed).
    Both ledger movements close the hold, so a second call moves nothing."""
    if audit.deposit_hold_id is not None:
        if proved:
            hold_release(hold=audit.deposit_hold, memo=f"deposit of audit #{audit.pk} returned")
            audit.deposit_state = Audit.DepositState.RETURNED
        else:
            hold_forfeit(hold=audit.deposit_hold, memo=f"deposit of audit #{audit.pk} forfeited: {audit.verdict}")
            audit.deposit_state = Audit.DepositState.FORFEITED
    audit.inputs = audit.claimed = audit.reference = b""
    audit.stored_bytes = 0
    audit.save(update_fields=["deposit_state", "inputs", "claimed", "reference", "stored_bytes"])


@transaction.atomic
def audit_verdict_record(*, audit_id: int, verdict: str, detail: str, validator_failed: bool = False) -> Audit:
    """Store the validator's verdict; when the provider cheated, void its work on the job,
    claw back what it was paid, and record the offence (once per provider and job). The
    deposit comes back when the provider cheated or the validator could not judge
    (``validator_failed``: no checkpoint, the platform's shortcoming), and is forfeited otherwise."""
    if verdict not in Audit.Verdict.values:
        raise ValidationFailed(f"verdict is one of {', '.join(Audit.Verdict.values)}", extra={"field": "verdict"})
    job_id = Audit.objects.filter(pk=audit_id).values_list("job_id", flat=True).first()
    if job_id is None:
        raise NotFound(f"no audit {audit_id}")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job_id)  # settlement's lock: no payment races this
    audit = Audit.objects.select_for_update(of=("self",)).select_related("provider", "deposit_hold").get(pk=audit_id)
    if audit.state == Audit.State.DECIDED:
        return audit
    audit.state, audit.verdict, audit.detail, audit.decided_at = (
        Audit.State.DECIDED,
        verdict,
        detail[:500],
        timezone.now(),
    )
    audit.save(update_fields=["state", "verdict", "detail", "decided_at"])
    _audit_deposit_settle(audit, proved=verdict == Audit.Verdict.PROVIDER_CHEATED or validator_failed)
    if verdict == Audit.Verdict.PROVIDER_CHEATED:
        taken = provider_job_void(job=job, provider=audit.provider)
        if not Offence.objects.filter(provider=audit.provider, job=job, kind=Offence.Kind.AUDIT).exists():
            provider_offence_record(
                provider=audit.provider,
                kind=Offence.Kind.AUDIT,
                job=job,
                audit=audit,
                detail=f"audit #{audit.pk} of job #{job.pk}: {detail}",
            )
        logger.warning(
            "audit #%s: provider %s cheated on job #%s; %s micro-credits clawed back",
            audit.pk,
            audit.provider_id,
            job.pk,
            taken,
        )
    return audit
