"""Writes for jobs: creation with its hold, the state machine, plans, and charging for work.

The scheduler drives jobs through these services (it never writes job rows itself):
``job_plan_store`` to store a plan, ``job_transition`` to move states, ``job_charge`` to pay a
provider from the job's hold. Every state change writes a :class:`JobTransition` row in the
same transaction, and entering a terminal state (done, failed, cancelled) releases what is
left of the hold.

States::

    pending ──> planned ──> running ──> settling ──> done
       │           │           │            │
       └───────────┴───────────┴────────────┴──> failed
       └───────────┴───────────┴──> cancelled
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction

from hivemart_core.protocol.identity import is_valid_public_key
from marketplace.accounts.models import User
from marketplace.catalog.selectors import catalog_model_for_use
from marketplace.common.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidTransition,
    PermissionDenied,
    ValidationFailed,
)
from marketplace.jobs.models import TERMINAL_STATES, Job, JobTransition, Plan, PlanBackup, PlanSegment
from marketplace.ledger.models import Transaction
from marketplace.ledger.services import MAX_AMOUNT, hold_capture, hold_place, hold_release, wallet_get_or_create
from marketplace.providers.models import Provider
from marketplace.providers.services import MAX_PRICE

S = Job.State
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.PLANNED, S.FAILED, S.CANCELLED}),
    S.PLANNED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.SETTLING, S.FAILED, S.CANCELLED}),
    S.SETTLING: frozenset({S.DONE, S.FAILED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
# What a job's owner may ask for through the API; the rest is the scheduler's (or staff's).
OWNER_TRANSITIONS = frozenset({S.RUNNING, S.SETTLING, S.CANCELLED})
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
MAX_THROUGHPUT = 1e15


# Called with a new job's id inside job_create's transaction (the scheduler registers one that
# queues its matching after commit); a plain list keeps this app free of Celery imports.
_job_created_hooks: list[Callable[[int], None]] = []
# Called with each newly stored plan inside job_plan_store's transaction (the receipts app
# registers one that issues the plan's tickets).
_plan_stored_hooks: list[Callable[[Plan], None]] = []
_CLIENT_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# Called with a job about to enter done, failed or cancelled, inside job_transition's
# transaction and before its hold is released (the receipts app settles the work uploaded so
# far, so that ending a job never skips paying for work already done).
_job_closing_hooks: list[Callable[[Job], None]] = []


def job_created_hook_register(hook: Callable[[int], None]) -> None:
    """Call ``hook(job_id)`` whenever a job is created (inside the creating transaction;
    use ``transaction.on_commit`` for side effects). Registering the same hook twice is a no-op."""
    if hook not in _job_created_hooks:
        _job_created_hooks.append(hook)


def plan_stored_hook_register(hook: Callable[[Plan], None]) -> None:
    """Call ``hook(plan)`` whenever a plan is stored (inside the storing transaction, after its
    segments and backups are written). Registering the same hook twice is a no-op."""
    if hook not in _plan_stored_hooks:
        _plan_stored_hooks.append(hook)


def job_closing_hook_register(hook: Callable[[Job], None]) -> None:
    """Call ``hook(job)`` before a job enters a terminal state (still in its old state, row
    locked, hold open). Registering the same hook twice is a no-op."""
    if hook not in _job_closing_hooks:
        _job_closing_hooks.append(hook)


def _check_reason(reason: str) -> str:
    if not isinstance(reason, str) or len(reason) > 200:
        raise ValidationFailed("a reason has at most 200 characters", extra={"field": "reason"})
    return reason


def _record_transition(job: Job, to_state: str, *, reason: str, actor: User | None, from_state: str = "") -> None:
    JobTransition.objects.create(job=job, from_state=from_state, to_state=to_state, reason=reason, actor=actor)


def job_create(
    *,
    user: User,
    kind: str,
    model_id: str,
    budget: int,
    max_price: int,
    idempotency_key: str,
    min_throughput: float | None = None,
    client_key: str = "",
) -> tuple[Job, bool]:
    """Create a job and hold its budget from the user's wallet, in one transaction.

    Returns ``(job, created)``. The same ``idempotency_key`` with the same parameters returns
    the job created the first time (``created`` False); with different parameters it is an
    IdempotencyConflict. InsufficientCredits when the wallet cannot cover the budget.
    ``client_key`` is the client's hex Ed25519 public key for this job (countersigns receipts).
    """
    if kind not in Job.Kind.values:
        raise ValidationFailed(f"kind is one of {', '.join(Job.Kind.values)}", extra={"field": "kind"})
    for name, value, top in (("budget", budget, MAX_AMOUNT), ("max_price", max_price, MAX_PRICE)):
        low = 1 if name == "budget" else 0
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
            raise ValidationFailed(
                f"{name} is an integer number of micro-credits between {low} and {top}", extra={"field": name}
            )
    if min_throughput is not None and (
        isinstance(min_throughput, bool)
        or not isinstance(min_throughput, (int, float))
        or not math.isfinite(min_throughput)
        or not 0 <= min_throughput <= MAX_THROUGHPUT
    ):
        raise ValidationFailed(
            f"min_throughput is a number of work units per second between 0 and {MAX_THROUGHPUT:g}",
            extra={"field": "min_throughput"},
        )
    if not isinstance(idempotency_key, str) or not _IDEMPOTENCY_KEY_RE.match(idempotency_key):
        raise ValidationFailed(
            "an idempotency key is 1 to 200 printable ASCII characters without spaces",
            extra={"field": "idempotency_key"},
        )
    if not isinstance(client_key, str) or not (client_key == "" or _CLIENT_KEY_RE.match(client_key.lower())):
        raise ValidationFailed(
            "client_key is a hex Ed25519 public key (64 hex characters)", extra={"field": "client_key"}
        )
    if client_key and not is_valid_public_key(bytes.fromhex(client_key)):
        # A small-order key would verify countersignatures anyone can forge.
        raise ValidationFailed(
            "client_key is not a usable Ed25519 public key (small order or not canonical); "
            "send the public key of a freshly generated identity",
            extra={"field": "client_key"},
        )
    model = catalog_model_for_use(model_id=model_id)
    wanted = dict(
        kind=kind,
        model_id=model.pk,
        budget=budget,
        max_price=max_price,
        min_throughput=None if min_throughput is None else float(min_throughput),
        client_key=client_key.lower(),
    )

    def replay(job: Job) -> tuple[Job, bool]:
        recorded = dict(
            kind=job.kind,
            model_id=job.model_id,
            budget=job.budget,
            max_price=job.max_price,
            min_throughput=job.min_throughput,
            client_key=job.client_key,
        )
        if recorded != wanted:
            raise IdempotencyConflict(
                "this idempotency key was used to create a different job",
                extra={"idempotency_key": idempotency_key, "job": job.pk},
            )
        return job, False

    with transaction.atomic():
        existing = Job.objects.filter(user=user, idempotency_key=idempotency_key).first()
        if existing is not None:
            return replay(existing)
        try:
            with transaction.atomic():
                job = Job.objects.create(user=user, idempotency_key=idempotency_key, **wanted)
        except IntegrityError:
            # A concurrent request with the same key committed first (the unique index made us wait).
            existing = Job.objects.filter(user=user, idempotency_key=idempotency_key).first()
            if existing is None:
                raise
            return replay(existing)
        job.hold = hold_place(account=wallet_get_or_create(user=user), amount=budget, memo=f"job #{job.pk}")
        job.save(update_fields=["hold"])
        _record_transition(job, S.PENDING, reason="created", actor=user)
        for hook in _job_created_hooks:
            hook(job.pk)
    return job, True


@transaction.atomic
def job_transition(*, job: Job, to_state: str, reason: str = "", actor: User | None = None) -> Job:
    """Move ``job`` to ``to_state`` if the state machine allows it, recording the transition.

    Entering done, failed or cancelled releases what is left of the job's hold. Moving to the
    state the job is already in is a no-op (so retried tasks are harmless); any other
    transition the machine does not allow is InvalidTransition.
    """
    if to_state not in S.values:
        raise ValidationFailed(f"state is one of {', '.join(S.values)}", extra={"field": "to_state"})
    _check_reason(reason)
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.state == to_state:
        return job
    if to_state not in ALLOWED_TRANSITIONS[job.state]:
        raise InvalidTransition(
            f"a {job.state} job cannot become {to_state}", extra={"state": job.state, "to_state": to_state}
        )
    if to_state in TERMINAL_STATES:
        for hook in _job_closing_hooks:
            hook(job)
    from_state, job.state = job.state, to_state
    job.save(update_fields=["state", "updated_at"])
    _record_transition(job, to_state, reason=reason, actor=actor, from_state=from_state)
    if to_state in TERMINAL_STATES and job.hold_id is not None:
        hold_release(hold=job.hold, memo=f"job #{job.pk} {to_state}")
    return job


def job_transition_request(*, job: Job, by: User, to_state: str, reason: str = "") -> Job:
    """A transition asked for through the API: owners may start, finish or cancel their jobs;
    staff may make any transition the state machine allows."""
    if not by.is_staff:
        if job.user_id != by.pk:
            raise PermissionDenied("this is not your job")
        if to_state not in OWNER_TRANSITIONS:
            raise PermissionDenied(
                f"only the scheduler moves a job to {to_state}", extra={"allowed": sorted(OWNER_TRANSITIONS)}
            )
    return job_transition(job=job, to_state=to_state, reason=reason, actor=by)


def job_cancel(*, job: Job, by: User, reason: str = "") -> Job:
    """Cancel a job (its owner or staff) and release its hold."""
    return job_transition_request(job=job, by=by, to_state=S.CANCELLED, reason=reason or "cancelled")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a plan, as the scheduler proposes it. Providers are given by id or instance;
    ``price`` defaults to the primary's current price, and each backup is recorded at its own."""

    block_start: int
    block_end: int
    provider: Provider | int
    backups: Sequence[Provider | int] = field(default_factory=tuple)
    price: int | None = None


def _provider_id(p: Provider | int) -> int:
    return p.pk if isinstance(p, Provider) else p


@transaction.atomic
def job_plan_store(*, job: Job, segments: Sequence[SegmentSpec], reason: str = "") -> Plan:
    """Store a new plan version for ``job`` and move a pending job to planned.

    The segments must cover blocks ``[0, num_blocks)`` of the job's model in order, without
    gaps or overlaps. Every primary and backup must serve the job's model over the whole
    segment, must not be suspended, and must ask at most the job's ``max_price``; a segment's
    backups are distinct and exclude its primary. Matching (who is online, throughput,
    ``min_throughput``) is the scheduler's job; this checks what would make the plan wrong.
    """
    _check_reason(reason)
    job = Job.objects.select_for_update(of=("self",)).select_related("model").get(pk=job.pk)
    if job.state not in (S.PENDING, S.PLANNED, S.RUNNING):
        raise InvalidTransition(f"a {job.state} job cannot be (re)planned", extra={"state": job.state})
    if not segments:
        raise ValidationFailed("a plan has at least one segment", extra={"field": "segments"})
    ids = {_provider_id(p) for s in segments for p in (s.provider, *s.backups)}
    providers = {p.pk: p for p in Provider.objects.filter(pk__in=ids)}
    cursor = 0
    for i, seg in enumerate(segments):
        where = {"field": "segments", "index": i}
        if seg.block_start != cursor or not seg.block_start < seg.block_end <= job.model.num_blocks:
            raise ValidationFailed(
                f"segment {i} must start at block {cursor} and end after it, at most at {job.model.num_blocks}",
                extra=where,
            )
        cursor = seg.block_end
        chain = [_provider_id(seg.provider), *map(_provider_id, seg.backups)]
        if len(set(chain)) != len(chain):
            raise ValidationFailed(f"segment {i} names a provider twice", extra=where)
        for pid in chain:
            p = providers.get(pid)
            if p is None:
                raise ValidationFailed(f"segment {i}: no provider {pid}", extra={**where, "provider": pid})
            if p.model_id != job.model_id or not (p.block_start <= seg.block_start and seg.block_end <= p.block_end):
                raise ValidationFailed(
                    f"segment {i}: provider {pid} does not serve blocks "
                    f"{seg.block_start}..{seg.block_end} of {job.model.model_id}",
                    extra={**where, "provider": pid},
                )
            if p.is_suspended:
                raise ValidationFailed(f"segment {i}: provider {pid} is suspended", extra={**where, "provider": pid})
            if p.price > job.max_price:
                raise ValidationFailed(
                    f"segment {i}: provider {pid} asks {p.price}, above the job's max_price",
                    extra={**where, "provider": pid},
                )
        if seg.price is not None and (
            not isinstance(seg.price, int) or isinstance(seg.price, bool) or not 0 <= seg.price <= job.max_price
        ):
            raise ValidationFailed(f"segment {i}: price must be an integer between 0 and max_price", extra=where)
    if cursor != job.model.num_blocks:
        raise ValidationFailed(
            f"the plan covers blocks 0..{cursor}, not all {job.model.num_blocks}", extra={"field": "segments"}
        )

    latest = job.plans.order_by("-version").values_list("version", flat=True).first() or 0
    plan = Plan.objects.create(job=job, version=latest + 1, reason=reason)
    for i, seg in enumerate(segments):
        primary = providers[_provider_id(seg.provider)]
        row = PlanSegment.objects.create(
            plan=plan,
            index=i,
            block_start=seg.block_start,
            block_end=seg.block_end,
            provider=primary,
            price=primary.price if seg.price is None else seg.price,
        )
        PlanBackup.objects.bulk_create(
            PlanBackup(
                segment=row, rank=rank, provider=providers[_provider_id(b)], price=providers[_provider_id(b)].price
            )
            for rank, b in enumerate(seg.backups)
        )
    for hook in _plan_stored_hooks:
        hook(plan)
    if job.state == S.PENDING:
        job_transition(job=job, to_state=S.PLANNED, reason=reason or f"plan v{plan.version}")
    return plan


def job_charge(*, job: Job, provider: Provider, amount: int, idempotency_key: str, memo: str = "") -> Transaction:
    """Pay ``provider`` ``amount`` micro-credits from the job's hold (minus the platform fee).

    For settling accepted work: the job must be running or settling, and the provider must
    appear in one of the job's plans (as primary or backup). Idempotent by ``idempotency_key``
    (scoped to the job), so a retried settlement pays once.
    """
    job = Job.objects.select_related("hold").get(pk=job.pk)
    if job.state not in (S.RUNNING, S.SETTLING):
        raise InvalidTransition(f"a {job.state} job cannot be charged", extra={"state": job.state})
    in_plan = (
        PlanSegment.objects.filter(plan__job=job, provider=provider).exists()
        or PlanBackup.objects.filter(segment__plan__job=job, provider=provider).exists()
    )
    if not in_plan:
        raise Conflict(
            f"provider {provider.pk} is not in any plan of job #{job.pk}",
            extra={"provider": provider.pk, "job": job.pk},
            code="not_in_plan",
        )
    if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 150:
        raise ValidationFailed("an idempotency key has 1 to 150 characters", extra={"field": "idempotency_key"})
    return hold_capture(
        hold=job.hold,
        amount=amount,
        payee=provider.earnings_account,
        idempotency_key=f"job:{job.pk}:{idempotency_key}",
        memo=memo or f"job #{job.pk}",
    )
