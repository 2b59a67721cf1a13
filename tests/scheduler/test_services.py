"""Scheduler services and task bodies, called directly against the real marketplace."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.common.errors import Conflict, InvalidTransition, PermissionDenied, ValidationFailed
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import job_plan_current
from marketplace.jobs.services import job_transition
from marketplace.ledger.selectors import hold_left, ledger_verify
from marketplace.providers.models import Provider
from marketplace.providers.services import provider_heartbeat
from scheduler import services, tasks
from tests.scheduler.factories import funded_user, make_job, make_model, make_provider, measured_provider

pytestmark = pytest.mark.django_db


def plan_of(job: Job) -> list[tuple[int, int, int, list[int]]]:
    plan = job_plan_current(job=job)
    assert plan is not None
    return [
        (s.block_start, s.block_end, s.provider_id, [b.provider_id for b in s.backups.all()])
        for s in plan.segments.all()
    ]


# --- job_match ---------------------------------------------------------------------------------


def test_job_match_stores_the_fastest_plan_within_the_price_cap() -> None:
    model = make_model(num_blocks=4)
    front = measured_provider(model=model, start=0, end=2, price=100, throughput=2000.0)
    back = measured_provider(model=model, start=2, end=4, price=100, throughput=2000.0)
    whole_slow = measured_provider(model=model, start=0, end=4, price=50, throughput=100.0)
    too_dear = measured_provider(model=model, start=0, end=4, price=9_000, throughput=1e6, latency_ms=0.0)
    job = make_job(model=model, max_price=1_000)

    outcome = tasks.job_match(job.pk)  # the task body, run in this process

    assert outcome == {"job": job.pk, "result": "planned", "reason": ""}
    job.refresh_from_db()
    assert job.state == Job.State.PLANNED
    segments = plan_of(job)
    assert [(s, e, p) for s, e, p, _ in segments] == [(0, 2, front.pk), (2, 4, back.pk)]
    # The slow whole-model provider backs up both segments; the over-priced one never appears.
    assert all(backups == [whole_slow.pk] for *_, backups in segments)
    assert too_dear.pk not in {p for _, _, p, b in segments for p in [p, *b]}
    # The plan's reason prices the chain in credits per million tokens (100 x 4 blocks) and
    # states no latency: the matcher's stands in a constant for unmeasured providers (#20).
    reason = job.plans.get().reason
    assert reason == "matched: 2 segment(s), 0.000400 credits/M tokens" and "ms/token" not in reason


def test_job_match_is_idempotent() -> None:
    model = make_model(num_blocks=2)
    measured_provider(model=model, start=0, end=2, price=100)
    job = make_job(model=model)

    assert services.job_match(job_id=job.pk).result == "planned"
    assert services.job_match(job_id=job.pk).result == "skipped"
    assert job.plans.count() == 1
    assert list(job.transitions.values_list("to_state", flat=True)) == ["pending", "planned"]
    assert services.job_match(job_id=10**9).result == "skipped"


def test_a_job_without_a_plan_fails_with_the_reason_and_gets_its_credits_back() -> None:
    model = make_model(num_blocks=4)
    measured_provider(model=model, start=0, end=2, price=100)
    measured_provider(model=model, start=2, end=4, price=1_500)
    user = funded_user(5_000_000)
    job = make_job(model=model, user=user, max_price=1_000, budget=1_000_000)

    outcome = services.job_match(job_id=job.pk)

    job.refresh_from_db()
    assert outcome.result == "failed" and job.state == Job.State.FAILED
    reason = job.transitions.get(to_state="failed").reason
    assert "blocks 2..4" in reason and "1500" in reason and "max_price" in reason
    assert hold_left(hold=job.hold) == 0
    assert ledger_verify().consistent


def test_degraded_providers_are_never_planned() -> None:
    model = make_model(num_blocks=2)
    liar = measured_provider(model=model, start=0, end=2, price=10, throughput=1e5, success_rate=0.5)
    honest = measured_provider(model=model, start=0, end=2, price=100, throughput=100.0)
    job = make_job(model=model)

    services.job_match(job_id=job.pk)

    assert plan_of(job) == [(0, 2, honest.pk, [])]
    assert liar.pk != honest.pk


def test_measured_figures_override_what_providers_report() -> None:
    model = make_model(num_blocks=2)
    boaster = make_provider(model=model, start=0, end=2, price=100)
    provider_heartbeat(provider=boaster, state="online", throughput=1e6, latency_ms=1.0)
    services.provider_probe_record(provider=boaster, throughput=10.0, latency_ms=500.0, success_rate=1.0, samples=2)
    modest = measured_provider(model=model, start=0, end=2, price=100, throughput=1000.0, latency_ms=20.0)
    job = make_job(model=model)

    services.job_match(job_id=job.pk)

    assert plan_of(job)[0][2] == modest.pk


def test_unmeasured_providers_are_planned_from_their_reports_and_silent_ones_are_not() -> None:
    model = make_model(num_blocks=2)
    reporting = make_provider(model=model, start=0, end=2, price=100)  # heartbeat with figures
    silent = make_provider(model=model, start=0, end=2, price=1, online=False)
    provider_heartbeat(provider=silent, state="online")  # online, but no throughput known
    job = make_job(model=model)

    services.job_match(job_id=job.pk)

    assert plan_of(job) == [(0, 2, reporting.pk, [])]


def test_min_throughput_is_per_chain_work_units() -> None:
    model = make_model(num_blocks=4)
    # 400 work units/s is 400 tokens/s through one block; a 4-block job's 1600 work units/s
    # asks 400 tokens/s of every segment, which one-block segments of this provider sustain.
    measured_provider(model=model, start=0, end=4, price=100, throughput=400.0)
    ok = make_job(model=model, min_throughput=1600.0)
    too_fast = make_job(model=model, min_throughput=1604.0)

    assert services.job_match(job_id=ok.pk).result == "planned"
    assert services.job_match(job_id=too_fast.pk).result == "failed"


def test_jobs_match_pending_requeues_only_old_pending_jobs() -> None:
    model = make_model(num_blocks=2)
    job = make_job(model=model)
    queued: list[int] = []

    assert services.jobs_match_pending(older_than_s=60, enqueue=queued.append) == []
    found = services.jobs_match_pending(
        older_than_s=60, now=timezone.now() + timedelta(minutes=5), enqueue=queued.append
    )
    assert found == queued == [job.pk]


# --- replanning --------------------------------------------------------------------------------


def test_replan_replaces_the_failed_primary_within_the_price_cap() -> None:
    model = make_model(num_blocks=4)
    first = measured_provider(model=model, start=0, end=2, price=100, throughput=5000.0)
    second = measured_provider(model=model, start=2, end=4, price=100, throughput=5000.0)
    spare = measured_provider(model=model, start=2, end=4, price=900, throughput=100.0)
    measured_provider(model=model, start=2, end=4, price=2_000, throughput=1e6)  # above the cap
    user = funded_user()
    job = make_job(model=model, user=user, max_price=1_000)
    services.job_match(job_id=job.pk)
    job_transition(job=job, to_state="running")

    result = services.job_replan(job=job, by=user, failed_provider_id=second.pk)

    assert result.plan.version == 2 and result.replaced == (1,)
    assert [(s, e, p) for s, e, p, _ in plan_of(job)] == [(0, 2, first.pk), (2, 4, spare.pk)]
    assert all(second.pk not in backups for *_, backups in plan_of(job))
    # A retry of the same report changes nothing.
    again = services.job_replan(job=job, by=user, failed_provider_id=second.pk)
    assert again.plan.version == 2 and again.replaced == ()


def test_replan_without_a_replacement_names_the_blocks() -> None:
    model = make_model(num_blocks=2)
    only = measured_provider(model=model, start=0, end=2, price=100)
    user = funded_user()
    job = make_job(model=model, user=user)
    services.job_match(job_id=job.pk)

    with pytest.raises(Conflict) as caught:
        services.job_replan(job=job, by=user, failed_provider_id=only.pk)
    assert caught.value.code == "no_plan" and caught.value.extra["gaps"][0]["start"] == 0
    with pytest.raises(PermissionDenied):
        services.job_replan(job=job, by=funded_user(), failed_provider_id=only.pk)
    with pytest.raises(ValidationFailed):
        services.job_replan(job=job, by=user, failed_provider_id=only.pk + 1000)


def test_replan_needs_a_planned_or_running_job() -> None:
    model = make_model(num_blocks=2)
    provider = measured_provider(model=model, start=0, end=2, price=100)
    user = funded_user()
    job = make_job(model=model, user=user)
    with pytest.raises(InvalidTransition):
        services.job_replan(job=job, by=user, failed_provider_id=provider.pk)


# --- housekeeping ------------------------------------------------------------------------------


def test_holds_expire_fails_idle_jobs_and_releases_their_holds() -> None:
    model = make_model(num_blocks=2)
    measured_provider(model=model, start=0, end=2, price=100)
    idle = make_job(model=model)
    running = make_job(model=model)
    services.job_match(job_id=running.pk)
    job_transition(job=running, to_state="running")

    assert services.holds_expire() == []
    later = timezone.now() + timedelta(hours=2)
    assert services.holds_expire(now=later) == [idle.pk]
    idle.refresh_from_db()
    assert idle.state == Job.State.FAILED and hold_left(hold=idle.hold) == 0
    assert services.holds_expire(now=timezone.now() + timedelta(days=2)) == [running.pk]
    assert ledger_verify().consistent


def test_providers_expire_marks_silent_providers_offline() -> None:
    model = make_model(num_blocks=2)
    provider = make_provider(model=model)
    assert services.providers_expire() == 0
    assert services.providers_expire(now=timezone.now() + timedelta(hours=1)) == 1
    provider.refresh_from_db()
    assert provider.state == Provider.State.OFFLINE


def test_placement_suggests_the_weakest_blocks() -> None:
    model = make_model(num_blocks=6)
    measured_provider(model=model, start=0, end=3, price=100, throughput=500.0)
    measured_provider(model=model, start=2, end=6, price=100, throughput=100.0)
    measured_provider(model=model, start=0, end=6, price=100, throughput=1e6, success_rate=0.1)  # degraded

    # Capacity per block: 500 500 600 100 100 100.
    assert services.placement_suggest(model=model, num_blocks=2) == (3, 5)
    assert tasks.placement_suggest(model.model_id, 3) == {"start": 3, "end": 6}
    assert services.placement_suggest(model=model, num_blocks=10) == (0, 6)
    with pytest.raises(ValidationFailed):
        services.placement_suggest(model=model, num_blocks=0)
