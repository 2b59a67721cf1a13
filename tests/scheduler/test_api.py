"""The scheduler's API: replanning around a failed provider, and placement."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from marketplace.accounts.services import api_key_create
from marketplace.jobs.services import job_transition
from scheduler import services
from tests.scheduler.factories import funded_user, make_job, make_model, measured_provider

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def test_reporting_a_failed_provider_returns_a_replacement_within_the_cap() -> None:
    model = make_model(num_blocks=4)
    first = measured_provider(model=model, start=0, end=4, price=100, throughput=9000.0)
    spare = measured_provider(model=model, start=0, end=4, price=800, throughput=100.0)
    measured_provider(model=model, start=0, end=4, price=5_000, throughput=1e6)  # above the cap
    user = funded_user()
    job = make_job(model=model, user=user, max_price=1_000)
    services.job_match(job_id=job.pk)
    job_transition(job=job, to_state="running")
    client = client_for(user)

    response = client.post(f"/api/jobs/{job.pk}/replan/", {"provider": first.pk}, format="json")

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["replaced"] == [0] and body["plan"]["version"] == 2
    assert [(s["provider"], s["price"]) for s in body["plan"]["segments"]] == [(spare.pk, 800)]

    again = client.post(f"/api/jobs/{job.pk}/replan/", {"provider": first.pk}, format="json").json()
    assert again["replaced"] == [] and again["plan"]["version"] == 2
    # Nobody else within the cap: a 409 naming the blocks.
    refused = client.post(f"/api/jobs/{job.pk}/replan/", {"provider": spare.pk}, format="json")
    assert refused.status_code == 409 and refused.json()["code"] == "no_plan"
    assert refused.json()["extra"]["gaps"][0]["needed_price"] == 5_000
    # Other users' jobs are invisible.
    assert (
        client_for(funded_user()).post(f"/api/jobs/{job.pk}/replan/", {"provider": spare.pk}, format="json").status_code
        == 404
    )
    assert client.post(f"/api/jobs/{job.pk}/replan/", {"provider": "x"}, format="json").status_code == 400


def test_placement_endpoint() -> None:
    model = make_model(num_blocks=4)
    measured_provider(model=model, start=0, end=2, price=100)
    client = client_for(funded_user())

    response = client.get("/api/placement/", {"model": model.model_id, "blocks": "2"})

    assert response.status_code == 200, response.json()
    assert response.json() == {"model": model.model_id, "block_start": 2, "block_end": 4}
    assert client.get("/api/placement/", {"model": model.model_id, "blocks": "0"}).status_code == 400
    assert client.get("/api/placement/", {"model": "nope", "blocks": "2"}).status_code == 400
