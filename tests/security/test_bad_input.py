"""Bad input is a 4xx in the one error shape, on both databases (issue 13, items 7 and 8).

Each case was a 500 (or, for ``?job=١``, silently read as job 1): deep JSON, non-scalar
receipt ids, oversized bodies (read in full even by unauthenticated sign-up), ids that are
not ASCII digits or do not fit 64 bits, HTML for a disallowed Host or a too-long URL under
``/api/``; and replanning around an offline primary.
"""

from __future__ import annotations

from typing import Any

import pytest

from marketplace.common.middleware import BODY_LIMITS, DEFAULT_BODY_LIMIT, MAX_API_URL_LENGTH
from marketplace.common.parsers import MAX_JSON_DEPTH, json_depth_exceeds
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_transition
from marketplace.providers.services import provider_heartbeat
from marketplace.receipts.models import Receipt
from scheduler import services
from tests.marketplace.factories import make_user, make_wallet
from tests.marketplace.settlement import planned_job
from tests.scheduler.factories import funded_user, make_job, make_model, measured_provider
from tests.security.helpers import api, assert_books_consistent, assert_error_shape

pytestmark = pytest.mark.django_db

TOO_BIG = 2**63
HUGE = 10**20


class ExplodingStream:
    """A request body that must never be read."""

    def read(self, *args: Any) -> bytes:
        raise AssertionError("the body was read")

    readline = read


# --- JSON -----------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_recursion_error() -> None:
    user = make_wallet(credits=1_000_000).user
    for i, body in enumerate(
        (
            "[" * 50_000 + "]" * 50_000,
            '{"a":' * 50_000 + "1" + "}" * 50_000,
            "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
        )
    ):
        # One key per body: a key reused with another body is refused before the body is read.
        key = f"deep-{i}"
        response = api(user).post("/api/jobs/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY=key)
        assert_error_shape(response, 400, "parse_error")
    assert not Job.objects.exists()


def test_the_depth_count_skips_brackets_inside_strings() -> None:
    assert not json_depth_exceeds(b'{"memo": "' + b"[{" * 1000 + b'", "x": "\\"[["}')
    assert json_depth_exceeds(b'{"memo": "\\\\"' + b", " + b"[" * (MAX_JSON_DEPTH + 1) + b"}")
    assert not json_depth_exceeds(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)


def test_a_receipt_whose_ticket_id_is_an_object_or_a_list_is_refused() -> None:
    pj = planned_job(backups=0)
    good = pj.receipt(pj.providers[0], 1_000).to_dict()
    for ticket_id in ({"a": 1}, [good["ticket_id"]]):
        for path, extra in (("/api/receipts/", {}), (f"/api/jobs/{pj.job.pk}/finish/", {})):
            response = api(pj.client).post(
                path, {"receipts": [{**good, "ticket_id": ticket_id}], **extra}, format="json"
            )
            assert_error_shape(response, 400, "invalid")
    assert not Receipt.objects.exists()
    assert Job.objects.get(pk=pj.job.pk).state == Job.State.RUNNING


# --- body size ------------------------------------------------------------------------------------


def test_unauthenticated_signup_reads_no_large_body() -> None:
    for size in (36 * 1024 * 1024 + 1, BODY_LIMITS["signup"] + 1):
        response = api().generic(
            "POST",
            "/api/auth/signup/",
            b"",
            content_type="application/json",
            **{"wsgi.input": ExplodingStream(), "CONTENT_LENGTH": str(size)},
        )
        body = assert_error_shape(response, 413, "too_large")
        assert body["extra"]["limit"] == BODY_LIMITS["signup"]


def test_body_limits_are_per_endpoint() -> None:
    user = make_user()
    response = api(user).generic(
        "POST",
        "/api/jobs/",
        b"",
        content_type="application/json",
        **{"wsgi.input": ExplodingStream(), "CONTENT_LENGTH": str(DEFAULT_BODY_LIMIT + 1)},
    )
    assert_error_shape(response, 413, "too_large")
    # An audit may be that large (its tensors are): the request reaches the view, which answers.
    big = b'{"job": "x", "pad": "' + b"a" * (DEFAULT_BODY_LIMIT + 1) + b'"}'
    response = api(user).post("/api/audits/", big, content_type="application/json")
    assert_error_shape(response, 400, "invalid")
    for bad in ("-1", "12abc", "１２", "9" * 40):
        response = api(user).generic(
            "POST",
            "/api/jobs/",
            b"",
            content_type="application/json",
            **{"wsgi.input": ExplodingStream(), "CONTENT_LENGTH": bad},
        )
        assert_error_shape(response, 400, "parse_error")


# --- ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "١", "1²", "+1", " 1", "1.0", "-1", "0", str(TOO_BIG), str(HUGE)])
@pytest.mark.parametrize(
    "path, name",
    [
        ("/api/receipts/", "job"),
        ("/api/ledger/postings/", "account"),
        ("/api/settlements/", "job"),
        ("/api/settlements/", "provider"),
        ("/api/offences/", "provider"),
    ],
)
def test_query_ids_are_ascii_digits_within_64_bits(path: str, name: str, value: str) -> None:
    pj = planned_job(backups=0)  # job 1 exists, and its owner asks: "١" must not read as 1
    response = api(pj.client).get(path, {name: value})
    body = assert_error_shape(response, 400, "invalid")
    assert body["extra"]["field"] == name


def test_path_ids_beyond_64_bits_are_404s_in_json() -> None:
    pj = planned_job(backups=0)
    for job_id in (str(TOO_BIG), str(HUGE), "9" * 400):
        for suffix in ("", "plan/", "transitions/", "tickets/", "cancel/", "replan/"):
            method = "post" if suffix in ("cancel/", "replan/") else "get"
            response = getattr(api(pj.client), method)(f"/api/jobs/{job_id}/{suffix}", {}, format="json")
            assert_error_shape(response, 404, "not_found")
    for path in (
        f"/api/ledger/accounts/{TOO_BIG}/",
        f"/api/ledger/holds/{HUGE}/",
        f"/api/providers/{HUGE}/",
        f"/api/keys/{TOO_BIG}/",
        f"/api/audits/{HUGE}/",
    ):
        assert_error_shape(api(pj.client).get(path), 404, "not_found")
    # The largest id that fits is well-formed, just absent.
    assert_error_shape(api(pj.client).get(f"/api/jobs/{TOO_BIG - 1}/"), 404, "not_found")


def test_body_ids_beyond_64_bits_are_400s() -> None:
    pj = planned_job(backups=0)
    staff = make_user(is_staff=True)
    provider = pj.providers[0]
    for value in (TOO_BIG, HUGE, -TOO_BIG - 1):
        response = api(pj.client).post(f"/api/jobs/{pj.job.pk}/replan/", {"provider": value}, format="json")
        assert_error_shape(response, 400, "invalid")
        plan = {"segments": [{"block_start": 0, "block_end": 4, "provider": value, "backups": [value]}]}
        assert_error_shape(api(staff).post(f"/api/jobs/{pj.job.pk}/plan/", plan, format="json"), 400, "invalid")
        payout = {"account": value, "amount": 1}
        assert_error_shape(api(staff).post("/api/ledger/payouts/", payout, format="json"), 400, "invalid")
        request = {"provider": value, "amount": 1}
        assert_error_shape(api(provider.user).post("/api/payouts/", request, format="json"), 400, "invalid")
    assert pj.job.plans.count() == 1
    assert_books_consistent()


def test_a_nul_character_in_an_api_url_is_a_400_on_every_database() -> None:
    user = make_user()
    for path in (
        "/api/models/a%00b/",
        "/api/models/a%00/offers/",
        "/api/jobs/?state=%00",
        "/api/receipts/?job=1%00",
        "/api/me/?x%00=1",
    ):
        assert_error_shape(api(user).get(path), 400, "invalid")


# --- Host and URL ---------------------------------------------------------------------------------


def test_a_disallowed_host_gets_json_under_api() -> None:
    response = api(make_user()).get("/api/me/", HTTP_HOST="evil.example")
    assert_error_shape(response, 400, "bad_request")


def test_a_too_long_api_url_gets_json() -> None:
    response = api(make_user()).get("/api/jobs/", {"state": "x" * MAX_API_URL_LENGTH})
    body = assert_error_shape(response, 414, "uri_too_long")
    assert body["extra"]["limit"] == MAX_API_URL_LENGTH


# --- replan around an offline primary -------------------------------------------------------------


def test_replan_works_when_the_failed_primary_is_offline() -> None:
    model = make_model(num_blocks=4)
    first = measured_provider(model=model, start=0, end=2, price=100, throughput=5000.0)
    second = measured_provider(model=model, start=2, end=4, price=100, throughput=5000.0)
    spare = measured_provider(model=model, start=2, end=4, price=900, throughput=100.0)
    user = funded_user()
    job = make_job(model=model, user=user, max_price=1_000)
    services.job_match(job_id=job.pk)
    job_transition(job=job, to_state="running")
    provider_heartbeat(provider=second, state="offline")  # it crashed: the case replan exists for

    response = api(user).post(f"/api/jobs/{job.pk}/replan/", {"provider": second.pk}, format="json")

    assert response.status_code == 200, response.json()
    segments = response.json()["plan"]["segments"]
    assert [(s["block_start"], s["block_end"], s["provider"]) for s in segments] == [(0, 2, first.pk), (2, 4, spare.pk)]
    assert response.json()["replaced"] == [1]
    # With the other primary offline too, reporting it still works (nobody else holds 0..2).
    provider_heartbeat(provider=first, state="offline")
    response = api(user).post(f"/api/jobs/{job.pk}/replan/", {"provider": first.pk}, format="json")
    assert_error_shape(response, 409, "no_plan")
    assert_books_consistent()
