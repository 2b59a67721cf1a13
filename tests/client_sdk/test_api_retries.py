"""Retries, idempotency keys and error mapping of the REST client.

The faults here (a 503, a dropped connection, a 429) cannot be produced on demand by the
real server, so these tests answer through an ``httpx.MockTransport``; everything else in
tests/client_sdk runs against the real marketplace.
"""

from __future__ import annotations

import httpx
import pytest

from hivemart_core.api import Client
from hivemart_core.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ValidationError,
)

JOB = {
    "id": 7,
    "kind": "inference",
    "model": "m",
    "state": "pending",
    "budget": 10,
    "max_price": 1,
    "min_throughput": None,
    "idempotency_key": "k",
    "hold": {"id": 1, "amount": 10, "left": 10, "state": "open"},
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
}


def error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"code": code, "message": f"{code}!", "extra": {"n": 1}},
        headers={"X-Request-Id": "rid-1", **headers},
    )


def scripted(*answers: httpx.Response | Exception) -> tuple[Client, list[httpx.Request], list[float]]:
    """A client whose requests get ``answers`` in order; returns it, the requests sent and the sleeps."""
    requests: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = Client(
        api_key="hm_test", base_url="http://market.test", max_retries=2, transport=httpx.MockTransport(handler)
    )
    sleeps: list[float] = []
    client._core._sleep = sleeps.append
    return client, requests, sleeps


def create(client: Client, **kwargs: object) -> object:
    return client.jobs.create(model="m", kind="inference", budget=10, max_price=1, **kwargs)


def test_job_creation_retries_5xx_with_the_same_idempotency_key() -> None:
    client, requests, sleeps = scripted(
        error(503, "server_error"), error(502, "server_error"), httpx.Response(201, json=JOB)
    )
    job = create(client)
    assert job.id == 7 and job.hold.left == 10
    keys = {r.headers["Idempotency-Key"] for r in requests}
    assert len(requests) == 3 and len(keys) == 1 and len(keys.pop()) == 32
    assert all(r.headers["Authorization"] == "Bearer hm_test" for r in requests)
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0  # jittered, growing bound


def test_a_given_idempotency_key_is_sent_as_is() -> None:
    client, requests, _ = scripted(httpx.Response(200, json=JOB))
    create(client, idempotency_key="my-key")
    assert requests[0].headers["Idempotency-Key"] == "my-key"


def test_retries_are_bounded() -> None:
    client, requests, _ = scripted(*[error(500, "server_error")] * 3)
    with pytest.raises(ServerError) as e:
        client.jobs.get(1)
    assert len(requests) == 3 and e.value.status == 500 and e.value.request_id == "rid-1"


def test_connection_errors_are_retried_then_wrapped_with_their_cause() -> None:
    cause = httpx.ConnectError("refused")
    client, requests, _ = scripted(cause, cause, cause)
    with pytest.raises(APIConnectionError) as e:
        client.jobs.get(1)
    assert e.value.__cause__ is cause and e.value.status is None and len(requests) == 3


def test_timeouts_raise_a_timeout_error() -> None:
    client, _, _ = scripted(*[httpx.ReadTimeout("slow")] * 3)
    with pytest.raises(APITimeoutError) as e:
        client.models.get("m")
    assert isinstance(e.value.__cause__, httpx.ReadTimeout)


SIGNUP = {
    "user": {"id": 1, "username": "u", "email": "", "is_staff": False, "wallet_balance": 0},
    "api_key": {
        "id": 1,
        "name": "x",
        "prefix": "p",
        "username": "u",
        "active": True,
        "created_at": "2026-01-01T00:00:00Z",
        "last_used_at": None,
        "revoked_at": None,
        "key": "hm_secret",
    },
}


def test_every_authenticated_post_is_retried_under_one_key() -> None:
    # A key creation carries a key the transport made: a lost reply is retried, and the
    # marketplace answers the retry with the first answer (the same key, not a second one).
    client, requests, _ = scripted(
        error(500, "server_error"), httpx.ReadError("reset"), httpx.Response(201, json=SIGNUP["api_key"])
    )
    assert client.keys.create(name="x").key == "hm_secret"
    keys = {r.headers["Idempotency-Key"] for r in requests}
    assert len(requests) == 3 and len(keys) == 1
    # Two calls are two logical requests: two keys.
    client, requests, _ = scripted(
        httpx.Response(201, json=SIGNUP["api_key"]), httpx.Response(201, json=SIGNUP["api_key"])
    )
    client.keys.create(name="x")
    client.keys.create(name="x")
    assert requests[0].headers["Idempotency-Key"] != requests[1].headers["Idempotency-Key"]


def test_a_post_still_running_under_its_key_is_retried() -> None:
    client, requests, sleeps = scripted(error(409, "idempotency_in_progress"), httpx.Response(200, json=[]))
    assert client.jobs.renew_tickets(7) == []
    assert len(requests) == 2 and len(sleeps) == 1
    assert requests[0].headers["Idempotency-Key"] == requests[1].headers["Idempotency-Key"]
    # Any other conflict is an answer, not a reason to retry.
    client, requests, _ = scripted(error(409, "idempotency_key_reused"))
    with pytest.raises(ConflictError):
        client.jobs.renew_tickets(7)
    assert len(requests) == 1


def test_unkeyed_posts_are_not_retried_after_reaching_the_server() -> None:
    # Sign-up is anonymous, so the marketplace does not key it and the transport sends none:
    # a 500 or a broken read may have created the account already.
    signup = {"username": "u", "password": "p" * 12}
    client, requests, _ = scripted(error(500, "server_error"))
    with pytest.raises(ServerError):
        client.accounts.signup(**signup)
    assert len(requests) == 1 and "Idempotency-Key" not in requests[0].headers
    client, requests, _ = scripted(httpx.ReadError("reset"))
    with pytest.raises(APIConnectionError):
        client.accounts.signup(**signup)
    assert len(requests) == 1
    # ... but one that never connected is safe to send again.
    client, requests, _ = scripted(httpx.ConnectError("refused"), httpx.Response(201, json=SIGNUP))
    assert client.accounts.signup(**signup).api_key.key == "hm_secret" and len(requests) == 2


def test_rate_limits_are_retried_after_the_servers_delay() -> None:
    client, requests, sleeps = scripted(
        error(429, "rate_limited", **{"Retry-After": "3"}), httpx.Response(200, json=JOB)
    )
    assert client.jobs.get(7).id == 7
    assert sleeps == [3.0]
    client, _, _ = scripted(*[error(429, "rate_limited", **{"Retry-After": "5"})] * 3)
    with pytest.raises(RateLimitError) as e:
        client.jobs.get(7)
    assert e.value.retry_after == 5.0


@pytest.mark.parametrize(
    "status, code, cls",
    [
        (400, "invalid", ValidationError),
        (401, "unauthenticated", AuthenticationError),
        (402, "insufficient_credits", InsufficientCreditsError),
        (403, "permission_denied", PermissionDeniedError),
        (404, "not_found", NotFoundError),
        (409, "idempotency_conflict", ConflictError),
        (418, "teapot", APIError),
    ],
)
def test_errors_map_onto_the_tree_without_retrying(status: int, code: str, cls: type[APIError]) -> None:
    client, requests, _ = scripted(error(status, code))
    with pytest.raises(cls) as e:
        client.jobs.get(1)
    assert (e.value.status, e.value.code, e.value.request_id, e.value.extra) == (status, code, "rid-1", {"n": 1})
    assert len(requests) == 1
    assert code in str(e.value) and "rid-1" in str(e.value)


def test_non_json_error_bodies_still_raise_typed_errors() -> None:
    client, _, _ = scripted(*[httpx.Response(502, text="<html>bad gateway</html>")] * 3)
    with pytest.raises(ServerError) as e:
        client.jobs.get(1)
    assert e.value.code == "error" and "bad gateway" in e.value.message


def test_no_api_key_fails_before_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEMART_API_KEY", raising=False)
    sent: list[httpx.Request] = []
    client = Client(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200, json={})))
    with pytest.raises(AuthenticationError):
        client.accounts.me()
    assert sent == []
    monkeypatch.setenv("HIVEMART_API_KEY", "hm_from_env")
    assert Client().api_key == "hm_from_env"
