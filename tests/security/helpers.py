"""Helpers of the adversarial suite: HTTP clients for attacker and victim, and the checks every
attack ends with (the books are consistent; a refusal is a 4xx in the one error shape)."""

from __future__ import annotations

from typing import Any

from rest_framework.test import APIClient

from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.ledger.selectors import ledger_verify


def api(user: User | None = None) -> APIClient:
    """An HTTP client authenticated as ``user`` with a fresh API key (anonymous for None)."""
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def assert_books_consistent() -> None:
    report = ledger_verify()
    assert report.consistent, report


def assert_error_shape(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The one API error shape, with the expected status (and code, when given)."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert set(body) == {"code", "message", "extra"}, body
    assert isinstance(body["message"], str) and body["message"] and isinstance(body["extra"], dict)
    if code is not None:
        assert body["code"] == code, body
    return body
