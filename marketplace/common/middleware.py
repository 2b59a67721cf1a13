"""Request ids (every response carries ``X-Request-Id`` so a client's error can be found in the
logs) and request limits (body size per endpoint, URL length), enforced before a body is read."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve

from marketplace.common.exceptions import error_body

REQUEST_ID_HEADER = "X-Request-Id"
# A proxy in front may already have assigned an id; accept it only if it is short and plain,
# since it is echoed into headers and logs.
_ACCEPTED_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request.request_id = incoming if _ACCEPTED_ID.match(incoming) else uuid.uuid4().hex
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request.request_id
        return response


# --- limits on requests, checked before anything reads them ----------------------------------

KIB, MIB = 1024, 1024 * 1024
# Request body limits per endpoint (URL name); every other path gets DEFAULT_BODY_LIMIT.
# Sign-up is open to anyone, so it reads next to nothing; audits carry three tensors of up to
# 8 MiB each, base64-encoded; receipt batches hold up to MAX_RECEIPTS_PER_UPLOAD (500) receipts.
BODY_LIMITS: dict[str, int] = {
    "signup": 16 * KIB,
    "provider-challenge": 16 * KIB,
    "receipts": 2 * MIB,
    "job-finish": 2 * MIB,
    "audits": 36 * MIB,
}
DEFAULT_BODY_LIMIT = 1 * MIB
# Below gunicorn's own request-line limit (4094 bytes), so that the API answers first, in JSON.
MAX_API_URL_LENGTH = 4000


def _api_error(request: HttpRequest, status: int, code: str, message: str, **extra: object) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(error_body(code, message, extra), status=status)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


def body_limit(path: str) -> int:
    """The most bytes a request body to ``path`` may have."""
    try:
        name = resolve(path).view_name
    except Resolver404:
        return DEFAULT_BODY_LIMIT
    return BODY_LIMITS.get(name, DEFAULT_BODY_LIMIT)


def _has_nul(request: HttpRequest) -> bool:
    return "\x00" in request.path or any(
        "\x00" in key or any("\x00" in v for v in values) for key, values in request.GET.lists()
    )


class RequestLimitsMiddleware:
    """Refuses, before any of it is read: a body over its endpoint's limit (413), a
    malformed Content-Length (400), an API URL over ``MAX_API_URL_LENGTH`` (414) or with a
    NUL character in its path or query (400: PostgreSQL text cannot hold one, so it would
    fail as a 500 wherever it reached a query). Under ``/api/`` the answer is the one JSON
    error shape."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/api/") and len(request.get_full_path()) > MAX_API_URL_LENGTH:
            return _api_error(
                request,
                414,
                "uri_too_long",
                f"the URL is longer than {MAX_API_URL_LENGTH} characters",
                limit=MAX_API_URL_LENGTH,
            )
        if request.path.startswith("/api/") and _has_nul(request):
            return _api_error(request, 400, "invalid", "the URL contains a NUL character")
        raw = request.META.get("CONTENT_LENGTH") or "0"
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            return _api_error(request, 400, "parse_error", "the Content-Length header is not a byte count")
        limit = body_limit(request.path_info)
        if int(raw) > limit:
            return _api_error(
                request,
                413,
                "too_large",
                f"the request body is {int(raw)} bytes; this endpoint takes at most {limit}",
                limit=limit,
            )
        return self.get_response(request)
