"""The SDK's error tree. Everything it raises on purpose derives from :class:`HivemartError`.

- :class:`ModelError`: a checkpoint is missing, malformed or of an unsupported architecture.
- :class:`ProtocolError`: a message on the wire is malformed (bad framing, shapes, dtypes, sizes).
- :class:`SwarmError`: the swarm cannot do what was asked; subclasses say what to do next.
- API errors (HTTP status, machine-readable code, request id) live in the section below.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HivemartError",
    "ModelError",
    "ProtocolError",
    "SwarmError",
    "NoProvidersError",
    "RemoteError",
    "ProviderUnavailableError",
    "StreamBrokenError",
    "APIError",
    "ValidationError",
    "AuthenticationError",
    "InsufficientCreditsError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "RateLimitError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
]


class HivemartError(Exception):
    """Root of every error the Hivemart SDK raises on purpose."""


# --- models and wire protocol -------------------------------------------------------------


class ModelError(HivemartError):
    """A checkpoint is missing, malformed, or of an architecture Hivemart does not support."""


class ProtocolError(HivemartError):
    """A message broke the wire protocol: framing, types, shapes, dtypes, sizes or counts.

    ``code`` is what a server answers with: ``bad_request``, or ``too_large`` for a
    message over a size limit.
    """

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


# --- swarm --------------------------------------------------------------------------------


class SwarmError(HivemartError):
    """The swarm could not serve a request."""


class NoProvidersError(SwarmError):
    """No live provider serves some blocks of a model."""

    def __init__(self, model_id: str, start: int, end: int, hint: str | None = None) -> None:
        self.model_id, self.start, self.end = model_id, start, end
        message = f"no provider serves blocks {start}..{end} of {model_id}"
        message += (
            f"; {hint}"
            if hint
            else f"; start one with `hivemart-provider run --model DIR --blocks {start}:{end}` (DIR: a checkpoint "
            f"directory of {model_id}, e.g. the one this client loaded)"
        )
        super().__init__(message)


# What to do about a provider's refusal, where the provider's own message cannot say it.
_REMOTE_HINTS = {
    "ticket_exhausted": "the job's budget for these blocks is used up: create the job with a larger budget "
    "(`--budget`, or `budget=` in the SDK); a higher `max_price` does not help, it only "
    "admits pricier providers, whose tickets buy fewer work units",
    "ack_overdue": "the provider waits for this client's countersigned receipts; a client on this SDK sends them "
    "by itself, so the session probably lost them: open a new session",
}


class RemoteError(SwarmError):
    """A provider answered a request with an error.

    ``code`` is the provider's machine-readable reason (``bad_request``, ``unknown_session``,
    ``cache_full``, ``ticket_exhausted``, ``ack_overdue``, ...); ``peer_id`` says which
    provider answered. The message ends with what to do, where that is known.
    """

    def __init__(
        self, code: str, message: str, *, peer_id: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        self.code, self.peer_id, self.extra = code, peer_id, extra or {}
        where = f" (provider {peer_id})" if peer_id else ""
        hint = f"; {_REMOTE_HINTS[code]}" if code in _REMOTE_HINTS else ""
        super().__init__(f"{code}: {message}{where}{hint}")


class ProviderUnavailableError(SwarmError):
    """A provider did not answer, or its connection broke, while serving a request."""

    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"provider {peer_id} is unavailable: {reason}")


class StreamBrokenError(ProviderUnavailableError):
    """A request's stream broke mid-way although the provider was reachable: worth retrying on
    the same provider before giving up on it (the daemons between us drop a stream now and then)."""


# --- marketplace REST API -----------------------------------------------------------------
# (API errors: APIError and its subclasses, defined below by the REST client.)


class APIError(HivemartError):
    """The marketplace refused a request, or could not be reached.

    ``status`` is the HTTP status (None when no response came back), ``code`` the
    marketplace's machine-readable reason (``insufficient_credits``, ``invalid``, ...),
    ``request_id`` the ``X-Request-Id`` to quote when reporting a problem, and ``extra``
    the error's details (for ``invalid``: ``extra["fields"]`` maps each bad field to what is
    wrong with it).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        request_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.message, self.status, self.code = message, status, code
        self.request_id, self.extra = request_id, extra or {}
        super().__init__(message)

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        rid = f", request id {self.request_id}" if self.request_id else ""
        return f"{self.code}: {self.message} ({where}{rid})"


class ValidationError(APIError):
    """400: the request's content was rejected; see ``extra`` for which field and why."""


class AuthenticationError(APIError):
    """401: no API key, or a malformed, unknown or revoked one. Check ``Client(api_key=...)``."""


class InsufficientCreditsError(APIError):
    """402: the wallet (or a hold) lacks the credits; ``extra`` says how many there are."""


class PermissionDeniedError(APIError):
    """403: authenticated, but not allowed (staff-only, someone else's object, a bad signature)."""


class NotFoundError(APIError):
    """404: no such object, or not one of yours."""


class ConflictError(APIError):
    """409: the request conflicts with the current state: a taken name, a job in the wrong
    state (code ``invalid_state``), an idempotency key reused for another request
    (``idempotency_conflict``)."""


class RateLimitError(APIError):
    """429: too many requests; ``retry_after`` says how many seconds to wait, when known."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class ServerError(APIError):
    """5xx: the marketplace failed; retried automatically, so seeing this means it kept failing."""


class APIConnectionError(APIError):
    """The marketplace could not be reached or the connection broke; the cause is chained
    (``raise ... from``). Retried automatically where that is safe."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "connection_error")
        super().__init__(message, **kwargs)


class APITimeoutError(APIConnectionError):
    """The marketplace did not answer within the client's timeout."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "timeout")
        super().__init__(message, **kwargs)
