"""Equivocation audits: two step records a provider signed for one step, decided from the
signatures alone; nobody can file one against a provider that did not sign both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from hivemart_core.protocol.commitments import sign_step
from hivemart_core.protocol.identity import Identity
from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.providers.models import Provider
from marketplace.receipts.models import Audit, Offence, Ticket
from tests.marketplace.factories import make_user
from tests.marketplace.settlement import PlannedJob, planned_job, platform_key_file

pytestmark = pytest.mark.django_db

URL = "/api/audits/equivocation/"


@pytest.fixture(autouse=True)
def _platform_key(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)


def api(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def records(
    identity: Identity,
    ticket_id: str,
    *,
    step_ids: tuple[int, int] = (3, 3),
    outputs: tuple[str, str] = ("aa" * 32, "bb" * 32),
    instances: tuple[str, str] = ("00112233aabbccdd",) * 2,
) -> list[dict[str, Any]]:
    return [
        sign_step(
            identity,
            session_id="upstream-sess-1",
            instance=instance,
            ticket_id=ticket_id,
            step_id=step_id,
            position=5,
            input_digest="cc" * 32,
            output_digest=output,
        ).to_dict()
        for step_id, output, instance in zip(step_ids, outputs, instances, strict=False)
    ]


def upstream(pj: PlannedJob) -> tuple[Provider, Identity, Ticket]:
    provider = pj.providers[0]
    return provider, pj.identities[provider.pk], Ticket.objects.get(job=pj.job, provider=provider)


def test_two_differing_records_of_one_step_convict_the_provider_at_once() -> None:
    pj = planned_job(segments=2, backups=1)
    provider, identity, ticket = upstream(pj)
    reputation = provider.reputation
    response = api(pj.client).post(
        URL,
        {"job": pj.job.pk, "ticket_id": ticket.ticket_id, "records": records(identity, ticket.ticket_id)},
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["state"], body["verdict"], body["provider"], body["claimed_proven"]) == (
        "decided",
        "provider_cheated",
        provider.pk,
        True,
    )
    assert "equivocation" in body["detail"] and "aa" * 32 in body["detail"] and "bb" * 32 in body["detail"]
    ticket.refresh_from_db()
    provider.refresh_from_db()
    assert ticket.voided_at is not None and provider.reputation < reputation
    assert Offence.objects.filter(provider=provider, job=pj.job, kind=Offence.Kind.AUDIT).count() == 1


@pytest.mark.parametrize(
    "attack",
    [
        "identical",
        "different-steps",
        "reopened-session",
        "forged-by-downstream",
        "another-ticket",
        "other-providers-records",
        "garbage",
    ],
)
def test_records_that_prove_nothing_convict_nobody(attack: str) -> None:
    pj = planned_job(segments=2, backups=1)
    provider, identity, ticket = upstream(pj)
    downstream = pj.identities[pj.providers[1].pk]
    evidence = {
        "identical": lambda: records(identity, ticket.ticket_id, outputs=("aa" * 32, "aa" * 32)),
        "different-steps": lambda: records(identity, ticket.ticket_id, step_ids=(3, 4)),
        # A client that reopened a session under its old id and replayed a step id: another instance.
        "reopened-session": lambda: records(
            identity, ticket.ticket_id, instances=("00112233aabbccdd", "ffeeddccbbaa9988")
        ),
        # The downstream signs what it claims it received and puts the upstream's name on it.
        "forged-by-downstream": lambda: [
            records(identity, ticket.ticket_id)[0],
            {**records(downstream, ticket.ticket_id)[1], "peer": provider.peer_id},
        ],
        "another-ticket": lambda: records(identity, "tkt_of_another_job"),
        "other-providers-records": lambda: records(downstream, ticket.ticket_id),
        "garbage": lambda: [{"peer": provider.peer_id}, {}],
    }[attack]()
    response = api(pj.client).post(
        URL, {"job": pj.job.pk, "ticket_id": ticket.ticket_id, "records": evidence}, format="json"
    )
    assert response.status_code == 400, response.json()
    assert response.json()["code"] == "bad_evidence"
    ticket.refresh_from_db()
    assert not Audit.objects.filter(job=pj.job).exists() and ticket.voided_at is None
    assert not Offence.objects.filter(provider=provider).exists()


def test_only_the_jobs_owner_may_file_one() -> None:
    pj = planned_job(segments=2, backups=1)
    _, identity, ticket = upstream(pj)
    response = api(make_user()).post(
        URL,
        {"job": pj.job.pk, "ticket_id": ticket.ticket_id, "records": records(identity, ticket.ticket_id)},
        format="json",
    )
    assert response.status_code == 404
    assert not Audit.objects.filter(job=pj.job).exists()
