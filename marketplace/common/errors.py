"""The ``ApplicationError`` hierarchy: what services raise when a request cannot be served.

Each error has a machine-readable ``code``, a human ``message``, an ``extra`` dict of
details and the HTTP ``status`` the API answers with. The API renders every error, these
and DRF's own, as ``{"code": ..., "message": ..., "extra": {...}}``; the SDK maps the code
and status back onto its error tree (``hivemart_core.errors``).
"""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    """Base class: a request that the marketplace refuses, with a reason a client can act on."""

    status: int = 400
    code: str = "error"

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        if code is not None:
            self.code = code


class ValidationFailed(ApplicationError):
    """The input is well-formed JSON but not acceptable (bad value, inconsistent fields)."""

    status, code = 400, "invalid"


class AuthenticationFailed(ApplicationError):
    status, code = 401, "unauthenticated"


class PermissionDenied(ApplicationError):
    status, code = 403, "permission_denied"


class NotFound(ApplicationError):
    status, code = 404, "not_found"


class Conflict(ApplicationError):
    """The request conflicts with the current state (duplicate, wrong state, reused key)."""

    status, code = 409, "conflict"


class IdempotencyConflict(Conflict):
    """An idempotency key was reused for a different request."""

    code = "idempotency_conflict"


class InvalidTransition(Conflict):
    """An object cannot move from its current state to the requested one."""

    code = "invalid_state"


class InsufficientCredits(ApplicationError):
    """An account or hold does not hold enough credits for the requested movement."""

    status, code = 402, "insufficient_credits"
