"""The REST API, endpoint by endpoint: success, permission denials and bad input.

Requests go through the real stack (URL routing, API-key authentication, serializers,
services, the exception handler), authenticated with real API keys.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from hivemart_core.protocol.identity import Identity
from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.common.models import IdempotencyRecord
from marketplace.jobs.services import SegmentSpec, job_charge, job_create, job_plan_store, job_transition
from marketplace.ledger.models import Account
from marketplace.providers.services import registration_message
from tests.marketplace.factories import digest, make_model, make_provider, make_user, make_wallet

pytestmark = pytest.mark.django_db


def client_for(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def assert_error(response: Any, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"code", "message", "extra"} and body["code"] == code, body
    assert response["X-Request-Id"]
    return body


@pytest.fixture
def alice() -> User:
    return make_wallet(user=make_user(username="alice"), credits=10_000_000).user


@pytest.fixture
def staff() -> User:
    return make_user(username="root", is_staff=True)


# --- authentication, error shape, request ids, schema --------------------------------------


def test_requests_without_a_key_are_refused_with_the_error_shape() -> None:
    response = APIClient().get("/api/jobs/")
    body = assert_error(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert body["message"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer hm_nothex_x",
        "Bearer " + "hm_" + "0" * 12 + "_" + "a" * 43,
        "Bearer",
        "Bearer a b",
        "Token abc",
    ],
)
def test_malformed_unknown_and_foreign_schemes_are_refused(header: str) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert_error(client.get("/api/me/"), 401, "unauthenticated")


def test_revoked_keys_stop_working(alice: User) -> None:
    created = api_key_create(user=alice)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.raw}")
    assert client.get("/api/me/").status_code == 200
    assert client.delete(f"/api/keys/{created.key.pk}/").json()["active"] is False
    assert_error(client.get("/api/me/"), 401, "unauthenticated")


def test_request_ids_are_echoed_or_generated(alice: User) -> None:
    client = client_for(alice)
    assert client.get("/api/me/", HTTP_X_REQUEST_ID="trace-12345678")["X-Request-Id"] == "trace-12345678"
    generated = client.get("/api/me/", HTTP_X_REQUEST_ID="bad id with spaces")["X-Request-Id"]
    assert len(generated) == 32 and " " not in generated


def test_unknown_api_paths_answer_in_the_error_shape(alice: User) -> None:
    assert_error(client_for(alice).get("/api/nothing-here/"), 404, "not_found")


def test_bad_json_and_wrong_media_types(alice: User) -> None:
    client = client_for(alice)
    assert_error(client.post("/api/keys/", data="{not json", content_type="application/json"), 400, "parse_error")
    assert_error(
        client.post("/api/keys/", data="name=x", content_type="application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    )
    body = assert_error(client.post("/api/keys/", data=[1, 2], format="json"), 400, "invalid")
    assert "non_field_errors" in body["extra"]["fields"]


def test_method_not_allowed(alice: User) -> None:
    assert_error(client_for(alice).put("/api/me/", {}, format="json"), 405, "method_not_allowed")


def test_openapi_schema_is_served() -> None:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/jobs/", "/api/providers/", "/api/ledger/accounts/", "/api/models/"} <= set(schema["paths"])


# --- accounts and keys -------------------------------------------------------------------


def test_signup_creates_a_user_and_a_working_key() -> None:
    response = APIClient().post(
        "/api/auth/signup/", {"username": "bob", "password": "a long passphrase 42"}, format="json"
    )
    assert response.status_code == 201, response.content
    key = response.json()["api_key"]["key"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/me/").json()["username"] == "bob"
    assert_error(
        APIClient().post("/api/auth/signup/", {"username": "bob", "password": "another long one 43"}, format="json"),
        409,
        "conflict",
    )


@pytest.mark.parametrize(
    "body, field",
    [
        ({"username": "carol", "password": "123"}, "password"),
        ({"username": "c", "password": "a long passphrase 42"}, "username"),
        ({"username": "x" * 151, "password": "a long passphrase 42"}, "username"),
        ({"username": "carol"}, "password"),
        ({"username": "carol", "password": "a long passphrase 42", "email": "not-an-email"}, "email"),
    ],
)
def test_signup_rejects_bad_input(body: dict, field: str) -> None:
    body_ = assert_error(APIClient().post("/api/auth/signup/", body, format="json"), 400, "invalid")
    assert field in body_["extra"].get("fields", {}) or body_["extra"].get("field") == field


def test_signup_can_be_closed(settings) -> None:  # noqa: ANN001 - pytest-django fixture
    settings.HIVEMART_OPEN_SIGNUP = False
    assert_error(
        APIClient().post("/api/auth/signup/", {"username": "dave", "password": "a long passphrase 42"}, format="json"),
        403,
        "permission_denied",
    )


def test_me_shows_the_wallet_balance(alice: User) -> None:
    assert client_for(alice).get("/api/me/").json() | {} == {
        "id": alice.pk,
        "username": "alice",
        "email": "",
        "is_staff": False,
        "wallet_balance": 10_000_000,
    }


def test_keys_are_listed_without_secrets_and_only_to_their_owner(alice: User, staff: User) -> None:
    client = client_for(alice)
    created = client.post("/api/keys/", {"name": "laptop"}, format="json")
    assert created.status_code == 201 and created.json()["key"].startswith("hm_")
    listed = client.get("/api/keys/").json()
    assert listed["count"] == 2 and all("key" not in k for k in listed["results"])
    bob = make_user()
    assert_error(client_for(bob).get(f"/api/keys/{created.json()['id']}/"), 404, "not_found")
    assert_error(client_for(bob).delete(f"/api/keys/{created.json()['id']}/"), 404, "not_found")
    assert client_for(staff).get("/api/keys/").json()["count"] >= 4
    assert_error(client.post("/api/keys/", {"name": "n" * 101}, format="json"), 400, "invalid")


def test_pagination(alice: User) -> None:
    client = client_for(alice)
    for i in range(4):
        client.post("/api/keys/", {"name": f"k{i}"}, format="json")
    page = client.get("/api/keys/?page_size=2").json()
    assert page["count"] == 5 and len(page["results"]) == 2 and page["next"] and page["previous"] is None
    assert len(client.get("/api/keys/?page_size=2&page=3").json()["results"]) == 1
    assert_error(client.get("/api/keys/?page=99"), 404, "not_found")


# --- catalog -----------------------------------------------------------------------------


def model_body(**overrides: Any) -> dict:
    body = {
        "model_id": "llama-2x64-abcdef012345",
        "arch": "llama",
        "num_blocks": 2,
        "hidden_size": 64,
        "dtype": "float32",
        "weights_digest": digest(1),
        "block_digests": [digest(2), digest(3)],
    }
    body.update(overrides)
    return body


def test_staff_catalogue_models_and_everyone_reads_them(alice: User, staff: User) -> None:
    created = client_for(staff).post("/api/models/", model_body(), format="json")
    assert created.status_code == 201, created.content
    assert created.json()["block_digests"] == [digest(2), digest(3)]
    listed = client_for(alice).get("/api/models/").json()
    assert [m["model_id"] for m in listed["results"]] == ["llama-2x64-abcdef012345"]
    assert client_for(alice).get("/api/models/llama-2x64-abcdef012345/").json()["num_blocks"] == 2
    assert_error(client_for(alice).get("/api/models/nope/"), 404, "not_found")
    assert_error(client_for(staff).post("/api/models/", model_body(), format="json"), 409, "conflict")


def test_only_staff_write_the_catalog(alice: User) -> None:
    make_model(model_id="m1")
    assert_error(client_for(alice).post("/api/models/", model_body(), format="json"), 403, "permission_denied")
    assert_error(client_for(alice).patch("/api/models/m1/", {"active": False}, format="json"), 403, "permission_denied")


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_blocks": "2"},
        {"num_blocks": 2.0},
        {"num_blocks": True},
        {"num_blocks": -1},
        {"hidden_size": None},
        {"model_id": "x" * 129},
        {"model_id": "bad id"},
        {"dtype": "int4"},
        {"weights_digest": "00"},
        {"block_digests": [digest(2)]},
        {"block_digests": "nope"},
        {"arch": 7},
    ],
)
def test_catalog_rejects_bad_input(staff: User, overrides: dict) -> None:
    assert_error(client_for(staff).post("/api/models/", model_body(**overrides), format="json"), 400, "invalid")


def test_withdrawn_models_disappear_for_users(alice: User, staff: User) -> None:
    make_model(model_id="m1")
    assert client_for(staff).patch("/api/models/m1/", {"active": False}, format="json").json()["active"] is False
    assert_error(client_for(alice).get("/api/models/m1/"), 404, "not_found")
    assert client_for(alice).get("/api/models/").json()["count"] == 0
    assert client_for(staff).get("/api/models/?include_inactive=true").json()["count"] == 1


# --- providers ---------------------------------------------------------------------------


def register_body(client: APIClient, identity: Identity, model_id: str, **overrides: Any) -> dict:
    challenge = client.post("/api/providers/challenge/").json()["challenge"]
    body = {
        "peer_id": identity.peer_id,
        "public_key": identity.public_key.hex(),
        "challenge": challenge,
        "signature": identity.sign(registration_message(challenge)).hex(),
        "model": model_id,
        "block_start": 0,
        "block_end": 4,
        "price": 1500,
        "gpu": "RTX 3090",
        "gpu_memory_mb": 24576,
        "region": "eu",
    }
    body.update(overrides)
    return body


def test_provider_registration_flow(alice: User) -> None:
    model, identity, client = make_model(num_blocks=4), Identity.generate(), client_for(alice)
    challenge = client.post("/api/providers/challenge/").json()
    assert challenge["message_prefix"] == "hivemart-register:" and len(challenge["challenge"]) == 64

    response = client.post("/api/providers/", register_body(client, identity, model.model_id), format="json")
    assert response.status_code == 201, response.content
    provider = response.json()
    assert provider["peer_id"] == identity.peer_id and provider["state"] == "joining"
    assert provider["measurement"] is None

    again = client.post("/api/providers/", register_body(client, identity, model.model_id, price=900), format="json")
    assert again.status_code == 200 and again.json()["id"] == provider["id"] and again.json()["price"] == 900

    beat = client.post(
        f"/api/providers/{provider['id']}/heartbeat/",
        {"state": "online", "throughput": 2500.5, "latency_ms": 15},
        format="json",
    )
    assert beat.status_code == 200 and beat.json()["state"] == "online"
    offers = client.get(f"/api/models/{model.model_id}/offers/").json()
    assert [(o["peer_id"], o["throughput"], o["measured"]) for o in offers] == [(identity.peer_id, 2500.5, False)]
    assert client.get("/api/providers/").json()["count"] == 1


@pytest.mark.parametrize(
    "overrides, status, code",
    [
        ({"signature": "00" * 64}, 403, "invalid_signature"),
        ({"peer_id": Identity.generate().peer_id}, 403, "peer_id_mismatch"),
        ({"challenge": "ab" * 32}, 400, "invalid_challenge"),
        ({"public_key": "zz" * 32}, 400, "invalid"),
        ({"public_key": "00" * 31}, 400, "invalid"),
        ({"signature": "00" * 63}, 400, "invalid"),
        ({"signature": 5}, 400, "invalid"),
        ({"model": "not-catalogued"}, 400, "invalid"),
        ({"block_end": 5}, 400, "invalid"),
        ({"block_start": "0"}, 400, "invalid"),
        ({"price": -1}, 400, "invalid"),
        ({"price": 10**16}, 400, "invalid"),
        ({"name": "n" * 101}, 400, "invalid"),
        ({"region": "somewhere with spaces"}, 400, "invalid"),
    ],
)
def test_provider_registration_rejects_bad_input(alice: User, overrides: dict, status: int, code: str) -> None:
    model, client = make_model(num_blocks=4), client_for(alice)
    body = register_body(client, Identity.generate(), model.model_id, **overrides)
    assert_error(client.post("/api/providers/", body, format="json"), status, code)


def test_providers_see_only_their_own_records(alice: User, staff: User) -> None:
    mine = make_provider(user=alice)
    theirs = make_provider()
    client = client_for(alice)
    assert [p["id"] for p in client.get("/api/providers/").json()["results"]] == [mine.pk]
    for path in (f"/api/providers/{theirs.pk}/", f"/api/providers/{theirs.pk}/measurements/"):
        assert_error(client.get(path), 404, "not_found")
    assert_error(
        client.post(f"/api/providers/{theirs.pk}/heartbeat/", {"state": "online"}, format="json"), 404, "not_found"
    )
    assert_error(client.patch(f"/api/providers/{theirs.pk}/", {"price": 1}, format="json"), 404, "not_found")
    assert client_for(staff).get(f"/api/providers/{theirs.pk}/").status_code == 200


def test_heartbeat_rejects_bad_input(alice: User) -> None:
    provider = make_provider(user=alice)
    client = client_for(alice)
    for body in (
        {"state": "asleep"},
        {"state": "online", "throughput": "fast"},
        {"state": "online", "throughput": -1},
        {},
        {"state": "online", "latency_ms": True},
    ):
        assert_error(client.post(f"/api/providers/{provider.pk}/heartbeat/", body, format="json"), 400, "invalid")


def test_offer_update(alice: User) -> None:
    model = make_model(num_blocks=8)
    provider = make_provider(user=alice, model=model, start=0, end=4)
    client = client_for(alice)
    updated = client.patch(
        f"/api/providers/{provider.pk}/", {"block_start": 4, "block_end": 8, "price": 3}, format="json"
    )
    assert updated.status_code == 200 and (updated.json()["block_start"], updated.json()["price"]) == (4, 3)
    assert_error(client.patch(f"/api/providers/{provider.pk}/", {"block_end": 9}, format="json"), 400, "invalid")


def test_measurements_are_recorded_by_staff_only_and_override_reports(alice: User, staff: User) -> None:
    model = make_model()
    provider = make_provider(user=alice, model=model)
    body = {"throughput": 321.0, "latency_ms": 40.0, "success_rate": 0.75, "samples": 8}
    assert_error(
        client_for(alice).post(f"/api/providers/{provider.pk}/measurements/", body, format="json"),
        403,
        "permission_denied",
    )
    assert client_for(staff).post(f"/api/providers/{provider.pk}/measurements/", body, format="json").status_code == 201
    assert_error(
        client_for(staff).post(
            f"/api/providers/{provider.pk}/measurements/", dict(body, success_rate=2), format="json"
        ),
        400,
        "invalid",
    )
    listed = client_for(alice).get(f"/api/providers/{provider.pk}/measurements/").json()
    assert [m["throughput"] for m in listed["results"]] == [321.0]
    [offer] = client_for(alice).get(f"/api/models/{model.model_id}/offers/").json()
    assert (offer["throughput"], offer["success_rate"], offer["measured"]) == (321.0, 0.75, True)


def test_suspension_is_staff_only_and_hides_offers(alice: User, staff: User) -> None:
    model = make_model()
    provider = make_provider(user=alice, model=model)
    assert_error(
        client_for(alice).post(f"/api/providers/{provider.pk}/suspend/", {"reason": "x"}, format="json"),
        403,
        "permission_denied",
    )
    suspended = client_for(staff).post(f"/api/providers/{provider.pk}/suspend/", {"reason": "lied"}, format="json")
    assert suspended.json()["suspended"] is True
    assert client_for(alice).get(f"/api/models/{model.model_id}/offers/").json() == []
    assert client_for(staff).post(f"/api/providers/{provider.pk}/reinstate/").json()["suspended"] is False
    assert_error(client_for(alice).get("/api/models/unknown/offers/"), 404, "not_found")


# --- jobs --------------------------------------------------------------------------------


def job_body(model_id: str, **overrides: Any) -> dict:
    body = {"kind": "inference", "model": model_id, "budget": 1_000_000, "max_price": 5_000}
    body.update(overrides)
    return body


def test_job_creation_is_idempotent_by_header(alice: User) -> None:
    model, client = make_model(), client_for(alice)
    first = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="job-1")
    assert first.status_code == 201, first.content
    job = first.json()
    assert (job["state"], job["hold"]["amount"], job["hold"]["left"]) == ("pending", 1_000_000, 1_000_000)
    # Within the retention period the API replays its first answer (marketplace.common.idempotency) ...
    again = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="job-1")
    assert again.status_code == 201 and again.json() == job and again["Idempotent-Replayed"] == "true"
    assert client.get("/api/me/").json()["wallet_balance"] == 9_000_000
    assert_error(
        client.post("/api/jobs/", job_body(model.model_id, budget=2), format="json", HTTP_IDEMPOTENCY_KEY="job-1"),
        409,
        "idempotency_key_reused",
    )
    # ... after it, the job's own key still finds the job (200) or refuses another one.
    IdempotencyRecord.objects.all().delete()
    later = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="job-1")
    assert later.status_code == 200 and later.json()["id"] == job["id"]
    IdempotencyRecord.objects.all().delete()
    assert_error(
        client.post("/api/jobs/", job_body(model.model_id, budget=2), format="json", HTTP_IDEMPOTENCY_KEY="job-1"),
        409,
        "idempotency_conflict",
    )
    assert client.get("/api/me/").json()["wallet_balance"] == 9_000_000
    body_key = client.post("/api/jobs/", job_body(model.model_id, idempotency_key="in-body"), format="json")
    assert body_key.status_code == 201
    assert_error(client.post("/api/jobs/", job_body(model.model_id), format="json"), 400, "invalid")


def test_job_creation_without_credits_is_402(alice: User) -> None:
    model = make_model()
    body = assert_error(
        client_for(alice).post(
            "/api/jobs/", job_body(model.model_id, budget=10_000_001), format="json", HTTP_IDEMPOTENCY_KEY="k"
        ),
        402,
        "insufficient_credits",
    )
    assert body["extra"]["balance"] == 10_000_000


@pytest.mark.parametrize(
    "overrides",
    [
        {"budget": -1},
        {"budget": 0},
        {"budget": 10**16},
        {"budget": "100"},
        {"budget": 1.5},
        {"budget": None},
        {"max_price": -5},
        {"kind": "mining"},
        {"model": "unknown-model"},
        {"model": "m" * 129},
        {"min_throughput": "fast"},
        {"min_throughput": -1},
    ],
)
def test_job_creation_rejects_bad_input(alice: User, overrides: dict) -> None:
    model = make_model()
    assert_error(
        client_for(alice).post(
            "/api/jobs/", job_body(model.model_id, **overrides), format="json", HTTP_IDEMPOTENCY_KEY="k"
        ),
        400,
        "invalid",
    )


def test_job_creation_rejects_bad_idempotency_keys(alice: User) -> None:
    model = make_model()
    assert_error(
        client_for(alice).post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="k" * 201),
        400,
        "invalid",
    )


def test_clients_see_only_their_own_jobs(alice: User, staff: User) -> None:
    model = make_model()
    client = client_for(alice)
    mine = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="a").json()
    bob = make_wallet(user=make_user(), credits=10**7).user
    theirs = (
        client_for(bob).post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="a").json()
    )
    assert [j["id"] for j in client.get("/api/jobs/").json()["results"]] == [mine["id"]]
    for path in (
        f"/api/jobs/{theirs['id']}/",
        f"/api/jobs/{theirs['id']}/transitions/",
        f"/api/jobs/{theirs['id']}/plan/",
    ):
        assert_error(client.get(path), 404, "not_found")
    assert_error(client.post(f"/api/jobs/{theirs['id']}/cancel/", {}, format="json"), 404, "not_found")
    assert client_for(staff).get("/api/jobs/").json()["count"] == 2
    assert client.get("/api/jobs/?state=pending").json()["count"] == 1
    assert client.get("/api/jobs/?state=done").json()["count"] == 0
    assert_error(client.get("/api/jobs/?state=bogus"), 400, "invalid")


def test_cancel_releases_the_hold(alice: User) -> None:
    model = make_model()
    client = client_for(alice)
    job = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="a").json()
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel/", {"reason": "oops"}, format="json").json()
    assert cancelled["state"] == "cancelled" and cancelled["hold"]["state"] == "closed"
    assert client.get("/api/me/").json()["wallet_balance"] == 10_000_000
    transitions = client.get(f"/api/jobs/{job['id']}/transitions/").json()
    assert [(t["from_state"], t["to_state"], t["actor"]) for t in transitions] == [
        ("", "pending", "alice"),
        ("pending", "cancelled", "alice"),
    ]
    assert client.post(f"/api/jobs/{job['id']}/cancel/", {}, format="json").status_code == 200  # again: no-op
    assert_error(
        client.post(f"/api/jobs/{job['id']}/transitions/", {"to_state": "running"}, format="json"), 409, "invalid_state"
    )


def test_transitions_owners_may_ask_for_and_those_they_may_not(alice: User, staff: User) -> None:
    model = make_model(num_blocks=4)
    provider = make_provider(model=model)
    client = client_for(alice)
    job = client.post("/api/jobs/", job_body(model.model_id), format="json", HTTP_IDEMPOTENCY_KEY="a").json()
    assert_error(
        client.post(f"/api/jobs/{job['id']}/transitions/", {"to_state": "done"}, format="json"),
        403,
        "permission_denied",
    )
    assert_error(
        client.post(f"/api/jobs/{job['id']}/transitions/", {"to_state": "flying"}, format="json"), 400, "invalid"
    )
    assert_error(client.get(f"/api/jobs/{job['id']}/plan/"), 404, "not_found")

    plan_body = {"segments": [{"block_start": 0, "block_end": 4, "provider": provider.pk}], "reason": "only one"}
    assert_error(client.post(f"/api/jobs/{job['id']}/plan/", plan_body, format="json"), 403, "permission_denied")
    stored = client_for(staff).post(f"/api/jobs/{job['id']}/plan/", plan_body, format="json")
    assert stored.status_code == 201, stored.content
    plan = client.get(f"/api/jobs/{job['id']}/plan/").json()
    assert plan["version"] == 1 and plan["segments"][0]["peer_id"] == provider.peer_id
    assert client.get(f"/api/jobs/{job['id']}/").json()["state"] == "planned"

    running = client.post(f"/api/jobs/{job['id']}/transitions/", {"to_state": "running"}, format="json")
    assert running.status_code == 200 and running.json()["state"] == "running"
    for bad in (
        {"segments": []},
        {"segments": [{"block_start": 0, "block_end": 3, "provider": provider.pk}]},
        {"segments": [{"block_start": "0", "block_end": 4, "provider": provider.pk}]},
        {"segments": [{"block_start": 0, "block_end": 4, "provider": 10**9}]},
    ):
        assert_error(client_for(staff).post(f"/api/jobs/{job['id']}/plan/", bad, format="json"), 400, "invalid")


# --- ledger ------------------------------------------------------------------------------


def test_ledger_reads_are_scoped_to_the_owner(alice: User, staff: User) -> None:
    model = make_model()
    client = client_for(alice)
    client.post("/api/jobs/", job_body(model.model_id, budget=250), format="json", HTTP_IDEMPOTENCY_KEY="a")
    accounts = client.get("/api/ledger/accounts/").json()["results"]
    assert sorted(a["kind"] for a in accounts) == ["escrow", "wallet"]
    wallet = next(a for a in accounts if a["kind"] == "wallet")
    assert wallet["balance"] == 10_000_000 - 250
    postings = client.get(f"/api/ledger/postings/?account={wallet['id']}").json()["results"]
    assert [(p["kind"], p["amount"]) for p in postings] == [("hold", -250), ("grant", 10_000_000)]
    holds = client.get("/api/ledger/holds/").json()["results"]
    assert [(h["amount"], h["left"], h["state"]) for h in holds] == [(250, 250, "open")]
    assert client.get(f"/api/ledger/holds/{holds[0]['id']}/").json()["left"] == 250
    assert_error(client.get("/api/ledger/postings/?account=x"), 400, "invalid")

    bob = make_wallet(user=make_user(), credits=5)
    assert_error(client.get(f"/api/ledger/accounts/{bob.pk}/"), 404, "not_found")
    assert client.get(f"/api/ledger/postings/?account={bob.pk}").json()["count"] == 0
    assert_error(client_for(bob.user).get(f"/api/ledger/holds/{holds[0]['id']}/"), 404, "not_found")
    assert client_for(staff).get(f"/api/ledger/accounts/{bob.pk}/").json()["balance"] == 5


def test_grants_are_staff_only(alice: User, staff: User) -> None:
    body = {"username": "alice", "amount": 500, "memo": "bonus", "idempotency_key": "g1"}
    assert_error(client_for(alice).post("/api/ledger/grants/", body, format="json"), 403, "permission_denied")
    granted = client_for(staff).post("/api/ledger/grants/", body, format="json")
    assert granted.status_code == 201 and sorted(p["amount"] for p in granted.json()["postings"]) == [-500, 500]
    client_for(staff).post("/api/ledger/grants/", body, format="json")  # same key: granted once
    assert client_for(alice).get("/api/me/").json()["wallet_balance"] == 10_000_500
    for bad in (
        {"username": "nobody", "amount": 1},
        {"username": "alice", "amount": 0},
        {"username": "alice", "amount": "5"},
        {"username": "alice", "amount": 10**16},
    ):
        assert_error(client_for(staff).post("/api/ledger/grants/", bad, format="json"), 400, "invalid")


def test_direct_payouts_are_staff_only(alice: User, staff: User) -> None:
    model = make_model(num_blocks=4)
    provider = make_provider(user=alice, model=model)
    payer = make_wallet(user=make_user(), credits=10_000).user
    job, _ = job_create(
        user=payer, kind="inference", model_id=model.model_id, budget=10_000, max_price=10**6, idempotency_key="j"
    )
    job_plan_store(job=job, segments=[SegmentSpec(0, 4, provider)])
    job_transition(job=job, to_state="running")
    job_charge(job=job, provider=provider, amount=10_000, idempotency_key="r1")
    earned = Account.objects.get(pk=provider.earnings_account_id).balance
    assert earned == 9_500

    # The provider's owner asks through POST /api/payouts/ (a request staff approve), never here.
    assert_error(
        client_for(alice).post(
            "/api/ledger/payouts/", {"account": provider.earnings_account_id, "amount": 9_000}, format="json"
        ),
        403,
        "permission_denied",
    )
    assert Account.objects.get(pk=provider.earnings_account_id).balance == 9_500
    client = client_for(staff)
    paid = client.post(
        "/api/ledger/payouts/", {"account": provider.earnings_account_id, "amount": 9_000}, format="json"
    )
    assert paid.status_code == 201, paid.content
    assert_error(
        client.post("/api/ledger/payouts/", {"account": provider.earnings_account_id, "amount": 501}, format="json"),
        402,
        "insufficient_credits",
    )
    wallet_id = Account.objects.get(kind="wallet", user=alice).pk
    assert_error(
        client.post("/api/ledger/payouts/", {"account": wallet_id, "amount": 1}, format="json"), 400, "invalid"
    )
    assert_error(
        client_for(payer).post(
            "/api/ledger/payouts/", {"account": provider.earnings_account_id, "amount": 1}, format="json"
        ),
        403,
        "permission_denied",
    )


def test_signup_is_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()
    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "signup", "2/hour")
    for i in range(2):
        assert (
            APIClient()
            .post("/api/auth/signup/", {"username": f"u{i}x", "password": "a long passphrase 42"}, format="json")
            .status_code
            == 201
        )
    response = APIClient().post(
        "/api/auth/signup/", {"username": "u9x", "password": "a long passphrase 42"}, format="json"
    )
    assert_error(response, 429, "rate_limited")
    assert int(response["Retry-After"]) > 0
    cache.clear()


def test_session_login_works_for_the_api_with_csrf_on_writes(alice: User) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get("/api/me/").json()["username"] == "alice"
    assert_error(client.post("/api/keys/", {"name": "x"}, format="json"), 403, "permission_denied")
