"""One error shape for the whole API: ``{"code": str, "message": str, "extra": dict}``."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions as drf
from rest_framework.response import Response

from marketplace.common.errors import ApplicationError

logger = logging.getLogger(__name__)

# DRF's exception classes and the codes the API uses for them (most specific first).
_DRF_CODES: list[tuple[type[drf.APIException], str]] = [
    (drf.NotAuthenticated, "unauthenticated"),
    (drf.AuthenticationFailed, "unauthenticated"),
    (drf.PermissionDenied, "permission_denied"),
    (drf.NotFound, "not_found"),
    (drf.MethodNotAllowed, "method_not_allowed"),
    (drf.NotAcceptable, "not_acceptable"),
    (drf.UnsupportedMediaType, "unsupported_media_type"),
    (drf.ParseError, "parse_error"),
    (drf.Throttled, "rate_limited"),
    (drf.ValidationError, "invalid"),
]


def error_body(code: str, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "extra": extra or {}}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: render any exception raised by a view in the one error shape."""
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.extra), status=exc.status)
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "not found"), status=404)
    if isinstance(exc, DjangoPermissionDenied):
        return Response(error_body("permission_denied", "you may not do this"), status=403)
    if isinstance(exc, RequestDataTooBig):  # RequestLimitsMiddleware refuses these first
        return Response(error_body("too_large", "the request body is too large"), status=413)
    if isinstance(exc, drf.APIException):
        code = next((c for cls, c in _DRF_CODES if isinstance(exc, cls)), "error")
        headers: dict[str, str] = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if isinstance(exc, drf.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(int(exc.wait) + 1)
        if isinstance(exc, drf.ValidationError):
            detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
            return Response(
                error_body(code, "invalid input: see extra.fields", {"fields": detail}),
                status=exc.status_code,
                headers=headers,
            )
        # When DRF cannot tell a client how to authenticate it turns 401 into 403.
        if exc.status_code == 403 and code == "unauthenticated":
            code = "permission_denied"
        return Response(error_body(code, str(exc.detail)), status=exc.status_code, headers=headers)
    request = context.get("request")
    logger.exception(
        "unhandled error in %s (request id %s)",
        context.get("view").__class__.__name__,
        getattr(request, "request_id", "-"),
    )
    return Response(
        error_body("server_error", "internal error; quote the X-Request-Id header when reporting it"), status=500
    )


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: the JSON error shape under ``/api/``, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("not_found", f"no such path: {request.path}"), status=404)
    return defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler400`` (a disallowed Host, other suspicious requests): the JSON error shape under
    ``/api/``, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("bad_request", "bad request: check the Host header and the URL"), status=400)
    return defaults.bad_request(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: the JSON error shape under ``/api/``, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            error_body("server_error", "internal error; quote the X-Request-Id header when reporting it"), status=500
        )
    return defaults.server_error(request)
