"""MarketJob against the real marketplace (in-process over WSGI): tickets, re-plans, finishing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from client_sdk.swarm.job import JobPlanError, MarketJob
from hivemart_core.api import Client
from marketplace.accounts.services import api_key_create
from tests.marketplace.settlement import planned_job, platform_key_file


@pytest.fixture
def platform_key(settings, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)


def client_of(user, transport: httpx.BaseTransport) -> Client:
    return Client(
        api_key=api_key_create(user=user).raw, base_url="http://testserver", transport=transport, max_retries=0
    )


def test_a_job_is_opened_from_its_tickets_replanned_and_finished(wsgi, platform_key) -> None:
    planned = planned_job(segments=2, backups=1)
    client = client_of(planned.client, wsgi)
    job = MarketJob.open(client, planned.job.pk, planned.client_identity, verify_rate=0.0)
    primaries = [p.peer_id for p in planned.providers]
    assert [c[0].peer_id for c in job.plan.segments] == primaries
    assert all(p.provider_id is not None for p in job.plan.providers())

    failed = planned.providers[1]
    job.replan(failed.pk)
    assert [c[0].peer_id for c in job.plan.segments] == [primaries[0], planned.backups[1].peer_id]
    assert failed.peer_id not in {p.peer_id for p in job.plan.providers()}
    assert job.ticket_for(planned.backups[1].peer_id, 2, 4) is not None

    summary = job.finish()
    assert summary["state"] == "settling" and summary["receipts"]["countersigned"] == 0


def test_a_job_of_another_client_key_is_refused(wsgi, platform_key) -> None:
    from hivemart_core.protocol.identity import Identity

    planned = planned_job()
    with pytest.raises(JobPlanError, match="another client key"):
        MarketJob.open(client_of(planned.client, wsgi), planned.job.pk, Identity.generate())


def test_replanning_with_nobody_left_says_so(wsgi, platform_key) -> None:
    planned = planned_job(backups=0)
    job = MarketJob.open(client_of(planned.client, wsgi), planned.job.pk, planned.client_identity, verify_rate=0.0)
    with pytest.raises(JobPlanError, match="cannot be re-planned"):
        job.replan(planned.providers[0].pk)
