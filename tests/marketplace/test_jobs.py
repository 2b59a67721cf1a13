"""Job services: creation with a hold, idempotency, the state machine, plans, charging."""

from __future__ import annotations

import pytest

from marketplace.catalog.services import catalog_model_set_active
from marketplace.common.errors import (
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidTransition,
    PermissionDenied,
    ValidationFailed,
)
from marketplace.jobs.models import Job, JobTransition
from marketplace.jobs.selectors import job_plan_current, jobs_in_state
from marketplace.jobs.services import (
    SegmentSpec,
    job_cancel,
    job_charge,
    job_create,
    job_plan_store,
    job_transition,
    job_transition_request,
)
from marketplace.ledger.models import Account, Hold
from marketplace.ledger.selectors import hold_left, ledger_verify
from marketplace.providers.services import provider_suspend
from tests.marketplace.factories import make_model, make_provider, make_user, make_wallet

pytestmark = pytest.mark.django_db


def funded_user(credits: int = 1_000_000):  # noqa: ANN201
    return make_wallet(user=make_user(), credits=credits).user


def new_job(user=None, model=None, **overrides):  # noqa: ANN001,ANN201
    fields = dict(kind="inference", budget=100_000, max_price=5_000, idempotency_key="k1")
    fields.update(overrides)
    job, _ = job_create(user=user or funded_user(), model_id=(model or make_model()).model_id, **fields)
    return job


def wallet_of(user) -> int:  # noqa: ANN001
    return Account.objects.get(kind="wallet", user=user).balance


def test_create_places_the_hold_in_the_same_transaction() -> None:
    user = funded_user(1_000_000)
    job = new_job(user=user, budget=250_000, min_throughput=100.0)
    assert job.state == Job.State.PENDING
    assert job.hold.amount == 250_000 and hold_left(hold=job.hold) == 250_000
    assert wallet_of(user) == 750_000
    assert list(job.transitions.values_list("from_state", "to_state")) == [("", "pending")]


def test_create_without_enough_credits_leaves_nothing_behind() -> None:
    user = funded_user(10)
    with pytest.raises(InsufficientCredits):
        new_job(user=user, budget=11)
    assert not Job.objects.exists() and not Hold.objects.exists()
    assert wallet_of(user) == 10


def test_create_is_idempotent_per_user_and_key() -> None:
    user, model = funded_user(), make_model()
    first, created = job_create(
        user=user, kind="finetune", model_id=model.model_id, budget=1000, max_price=10, idempotency_key="abc"
    )
    again, created_again = job_create(
        user=user, kind="finetune", model_id=model.model_id, budget=1000, max_price=10, idempotency_key="abc"
    )
    assert created and not created_again and again.pk == first.pk
    assert Hold.objects.count() == 1
    with pytest.raises(IdempotencyConflict):
        job_create(
            user=user, kind="finetune", model_id=model.model_id, budget=2000, max_price=10, idempotency_key="abc"
        )
    # another user's identical key is another job
    other, created_other = job_create(
        user=funded_user(), kind="finetune", model_id=model.model_id, budget=1000, max_price=10, idempotency_key="abc"
    )
    assert created_other and other.pk != first.pk


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(kind="training"), "kind"),
        (dict(budget=0), "budget"),
        (dict(budget=-5), "budget"),
        (dict(budget=10**16), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(max_price=-1), "max_price"),
        (dict(min_throughput=float("inf")), "min_throughput"),
        (dict(idempotency_key=""), "idempotency_key"),
        (dict(idempotency_key="has space"), "idempotency_key"),
        (dict(idempotency_key="k" * 201), "idempotency_key"),
    ],
)
def test_create_rejects_bad_input(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationFailed) as e:
        new_job(**overrides)
    assert e.value.extra["field"] == field


def test_only_catalogued_active_models_can_be_requested() -> None:
    user = funded_user()
    with pytest.raises(ValidationFailed):
        job_create(user=user, kind="inference", model_id="nope", budget=1, max_price=1, idempotency_key="a")
    model = catalog_model_set_active(model=make_model(), active=False)
    with pytest.raises(ValidationFailed):
        job_create(user=user, kind="inference", model_id=model.model_id, budget=1, max_price=1, idempotency_key="b")


def test_cancel_releases_the_hold_and_records_the_transition() -> None:
    user = funded_user(1_000)
    job = new_job(user=user, budget=600)
    job = job_cancel(job=job, by=user, reason="changed my mind")
    assert job.state == Job.State.CANCELLED
    assert wallet_of(user) == 1_000
    assert Hold.objects.get(pk=job.hold_id).state == Hold.State.CLOSED
    last = job.transitions.last()
    assert (last.from_state, last.to_state, last.reason, last.actor) == (
        "pending",
        "cancelled",
        "changed my mind",
        user,
    )
    with pytest.raises(InvalidTransition):
        job_transition(job=job, to_state="running")


def test_only_the_owner_or_staff_may_cancel() -> None:
    job = new_job()
    with pytest.raises(PermissionDenied):
        job_cancel(job=job, by=make_user())
    staff = make_user(is_staff=True)
    assert job_cancel(job=job, by=staff).state == Job.State.CANCELLED


def test_owners_may_not_settle_their_own_jobs() -> None:
    job = new_job()
    with pytest.raises(PermissionDenied):
        job_transition_request(job=job, by=job.user, to_state="done")


def two_segment_setup():  # noqa: ANN201
    model = make_model(num_blocks=8)
    head, head_backup = make_provider(model=model, start=0, end=4, price=100), make_provider(model=model, price=300)
    tail = make_provider(model=model, start=4, end=8, price=200)
    return model, head, head_backup, tail


def test_plan_store_moves_a_pending_job_to_planned() -> None:
    model, head, head_backup, tail = two_segment_setup()
    job = new_job(model=model)
    plan = job_plan_store(
        job=job,
        segments=[SegmentSpec(0, 4, head, backups=[head_backup]), SegmentSpec(4, 8, tail.pk)],
        reason="cheapest chain",
    )
    job.refresh_from_db()
    assert job.state == Job.State.PLANNED
    current = job_plan_current(job=job)
    assert current.pk == plan.pk and current.version == 1
    segs = list(current.segments.all())
    assert [(s.block_start, s.block_end, s.provider_id, s.price) for s in segs] == [
        (0, 4, head.pk, 100),
        (4, 8, tail.pk, 200),
    ]
    assert [(b.rank, b.provider_id, b.price) for b in segs[0].backups.all()] == [(0, head_backup.pk, 300)]

    replan = job_plan_store(job=job, segments=[SegmentSpec(0, 8, head_backup)], reason="head left")
    assert replan.version == 2 and job_plan_current(job=job).pk == replan.pk
    assert JobTransition.objects.filter(job=job, to_state="planned").count() == 1


@pytest.mark.parametrize(
    "make_segments",
    [
        lambda h, hb, t: [SegmentSpec(0, 4, h)],  # does not cover all blocks
        lambda h, hb, t: [SegmentSpec(0, 4, h), SegmentSpec(5, 8, hb)],  # gap
        lambda h, hb, t: [SegmentSpec(0, 4, h), SegmentSpec(3, 8, hb)],  # overlap
        lambda h, hb, t: [SegmentSpec(0, 8, h)],  # provider does not serve blocks 4..8
        lambda h, hb, t: [SegmentSpec(0, 4, h, backups=[h]), SegmentSpec(4, 8, t)],  # primary as its own backup
        lambda h, hb, t: [SegmentSpec(0, 4, h, backups=[t]), SegmentSpec(4, 8, t)],  # backup does not cover
        lambda h, hb, t: [SegmentSpec(0, 4, h, price=10**9), SegmentSpec(4, 8, t)],  # above max_price
        lambda h, hb, t: [SegmentSpec(0, 4, 10**9), SegmentSpec(4, 8, t)],  # unknown provider
        lambda h, hb, t: [],
    ],
)
def test_plan_store_rejects_wrong_plans(make_segments) -> None:  # noqa: ANN001
    model, head, head_backup, tail = two_segment_setup()
    job = new_job(model=model)
    with pytest.raises(ValidationFailed):
        job_plan_store(job=job, segments=make_segments(head, head_backup, tail))
    job.refresh_from_db()
    assert job.state == Job.State.PENDING and job_plan_current(job=job) is None


def test_plan_store_rejects_providers_above_max_price_or_suspended() -> None:
    model, head, head_backup, tail = two_segment_setup()
    job = new_job(model=model, max_price=250)
    with pytest.raises(ValidationFailed):  # the backup asks 300
        job_plan_store(job=job, segments=[SegmentSpec(0, 4, head, backups=[head_backup]), SegmentSpec(4, 8, tail)])
    provider_suspend(provider=tail, reason="audit")
    with pytest.raises(ValidationFailed):
        job_plan_store(job=job, segments=[SegmentSpec(0, 4, head), SegmentSpec(4, 8, tail)])


def test_full_lifecycle_charges_providers_and_refunds_the_rest() -> None:
    model, head, _, tail = two_segment_setup()
    user = funded_user(1_000_000)
    job = new_job(user=user, model=model, budget=100_000)
    job_plan_store(job=job, segments=[SegmentSpec(0, 4, head), SegmentSpec(4, 8, tail)])
    with pytest.raises(InvalidTransition):  # not running yet
        job_charge(job=job, provider=head, amount=1, idempotency_key="r0")
    job_transition_request(job=job, by=user, to_state="running")

    job_charge(job=job, provider=head, amount=30_000, idempotency_key="receipt-1")
    job_charge(job=job, provider=head, amount=30_000, idempotency_key="receipt-1")  # a retried settlement
    job_charge(job=job, provider=tail, amount=20_000, idempotency_key="receipt-2")
    with pytest.raises(Conflict):
        job_charge(job=job, provider=make_provider(model=model), amount=1, idempotency_key="r3")  # not in the plan
    with pytest.raises(InsufficientCredits):
        job_charge(job=job, provider=tail, amount=50_001, idempotency_key="receipt-3")

    job_transition_request(job=job, by=user, to_state="settling")
    job_transition(job=job, to_state="done", reason="settled")
    assert wallet_of(user) == 1_000_000 - 50_000
    fee = 30_000 * 500 // 10_000
    assert Account.objects.get(pk=head.earnings_account_id).balance == 30_000 - fee
    assert list(Job.objects.get(pk=job.pk).transitions.values_list("to_state", flat=True)) == [
        "pending",
        "planned",
        "running",
        "settling",
        "done",
    ]
    assert ledger_verify().consistent


def test_failing_a_running_job_keeps_charges_and_releases_the_rest() -> None:
    model, head, _, tail = two_segment_setup()
    user = funded_user(10_000)
    job = new_job(user=user, model=model, budget=10_000)
    job_plan_store(job=job, segments=[SegmentSpec(0, 4, head), SegmentSpec(4, 8, tail)])
    job_transition(job=job, to_state="running")
    job_charge(job=job, provider=tail, amount=1_000, idempotency_key="r1")
    job_transition(job=job, to_state="failed", reason="no providers left")
    assert wallet_of(user) == 9_000
    assert job_transition(job=job, to_state="failed").state == "failed"  # repeating is harmless
    with pytest.raises(InvalidTransition):
        job_charge(job=job, provider=tail, amount=1, idempotency_key="r2")


def test_jobs_in_state_lists_oldest_first() -> None:
    a, b = new_job(idempotency_key="a"), new_job(idempotency_key="b")
    job_cancel(job=b, by=b.user)
    assert list(jobs_in_state(state="pending")) == [a]
