"""The admin covers every marketplace model, renders, and moves money only through services."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import api_key_authenticate
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_create
from marketplace.ledger.models import Hold
from tests.marketplace.factories import make_model, make_provider, make_user, make_wallet

pytestmark = pytest.mark.django_db
MARKETPLACE_APPS = ["accounts", "catalog", "providers", "jobs", "ledger"]


@pytest.fixture
def superuser_client() -> Client:
    user = make_user(username="admin", password="a long admin passphrase", is_staff=True)
    user.is_superuser = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def test_every_marketplace_model_is_in_the_admin() -> None:
    missing = [
        m.__name__
        for app in MARKETPLACE_APPS
        for m in apps.get_app_config(app).get_models()
        if not admin.site.is_registered(m)
    ]
    assert missing == []


def test_every_changelist_and_change_page_renders(superuser_client: Client) -> None:
    user = make_wallet(user=make_user(), credits=1_000).user
    model = make_model()
    make_provider(model=model)
    job_create(user=user, kind="inference", model_id=model.model_id, budget=100, max_price=10**6, idempotency_key="a")
    for app in MARKETPLACE_APPS:
        for m in apps.get_app_config(app).get_models():
            meta = m._meta
            url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
            assert superuser_client.get(url).status_code == 200, url
            obj = m.objects.first()
            if obj is not None:
                url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
                assert superuser_client.get(url).status_code == 200, url


def test_adding_an_api_key_in_the_admin_shows_it_once(superuser_client: Client) -> None:
    owner = make_user()
    response = superuser_client.post(
        reverse("admin:accounts_apikey_add"), {"user": owner.pk, "name": "from admin"}, follow=True
    )
    assert response.status_code == 200
    [message] = [str(m) for m in response.context["messages"] if "copy it now" in str(m)]
    raw = message.split(": ", 1)[1].split(" ", 1)[0]
    assert api_key_authenticate(raw=raw).user == owner
    assert ApiKey.objects.get(user=owner).secret_hash != raw


def test_cancelling_a_job_in_the_admin_releases_its_hold(superuser_client: Client) -> None:
    user = make_wallet(user=make_user(), credits=1_000).user
    job, _ = job_create(
        user=user, kind="inference", model_id=make_model().model_id, budget=400, max_price=1, idempotency_key="a"
    )
    superuser_client.post(reverse("admin:jobs_job_changelist"), {"action": "cancel", "_selected_action": [job.pk]})
    assert Job.objects.get(pk=job.pk).state == "cancelled"
    assert Hold.objects.get(pk=job.hold_id).state == "closed"
