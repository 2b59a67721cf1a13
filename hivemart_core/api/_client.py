"""The HTTP core of the REST client: authentication, retries, error mapping."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

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

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "hivemart-python/0.1.0"
IDEMPOTENCY_HEADER = "Idempotency-Key"

_ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,  # too_large: the body is over the endpoint's limit
    414: ValidationError,  # uri_too_long
    422: ValidationError,
    429: RateLimitError,
}
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
# Methods that may be repeated without changing the outcome. A POST is retried only when it
# carries an idempotency key (or never reached the server), so a retry cannot act twice: the
# marketplace replays the first answer to a key (``marketplace.common.idempotency``).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# The 409 the marketplace answers while the first request with a key still runs: worth a retry.
_IN_PROGRESS_CODE = "idempotency_in_progress"
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 8.0
_RETRY_AFTER_MAX_S = 60.0


def normalize_base_url(url: str) -> str:
    """The marketplace's root URL as the client joins paths to it: ``https://m.example/api/``
    and ``https://m.example/`` both become ``https://m.example`` (every path the client sends
    starts with ``/api/``, so a base ending in ``/api`` would ask for ``/api/api/...``)."""
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")) or len(root.split("://", 1)[1]) == 0:
        raise ValueError(
            f"the marketplace URL must start with http:// or https://, e.g. {DEFAULT_BASE_URL}; got {url!r}"
        )
    return root.removesuffix("/api").rstrip("/")


def new_idempotency_key() -> str:
    """A fresh key for one logical POST (random: two calls never share one by accident)."""
    return uuid.uuid4().hex


def _in_progress(response: httpx.Response) -> bool:
    """Whether the answer is the marketplace's "a request with this key is still running"."""
    if response.status_code != 409:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") == _IN_PROGRESS_CODE


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare enough to fall back to our own backoff
        return None


def error_from_response(response: httpx.Response) -> APIError:
    """The SDK error for a non-2xx response (the body is the marketplace's error shape when it can be parsed)."""
    request_id = response.headers.get("X-Request-Id")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        code, message, extra = body["code"], str(body.get("message", "")), body.get("extra") or {}
    else:
        code, message, extra = "error", response.text[:500] or response.reason_phrase, {}
    cls = _ERRORS_BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else APIError
    kwargs: dict[str, Any] = dict(
        status=response.status_code,
        code=code,
        request_id=request_id,
        extra=extra if isinstance(extra, dict) else {"detail": extra},
    )
    if cls is RateLimitError:
        kwargs["retry_after"] = _retry_after(response)
    return cls(message, **kwargs)


class HTTPCore:
    """Sends requests with the API key, retries what is safe to retry, and raises SDK errors."""

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str,
        timeout: float,
        max_retries: int,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.api_key = api_key
        self.max_retries = max_retries
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        self._http = httpx.Client(
            base_url=normalize_base_url(base_url),
            timeout=timeout,
            headers=headers,
            transport=transport,
            follow_redirects=False,
        )
        # Replaceable in tests so that backoff does not slow them down.
        self._sleep: Callable[[float], None] = time.sleep

    def close(self) -> None:
        self._http.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, _RETRY_AFTER_MAX_S)
        # Full jitter: many clients retrying after one outage spread out instead of stampeding.
        return random.uniform(0, min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt))

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        auth: bool = True,
    ) -> Any:
        """Send one API request (retrying as documented) and return the decoded JSON body.

        Every authenticated POST carries an ``Idempotency-Key``: ``idempotency_key`` when
        given, else a new random one, made once here and sent unchanged on every retry of this
        call (as Stripe's client does). That is what makes the POST safe to retry. An
        unauthenticated POST (sign-up) gets none, as the marketplace keys requests per user;
        it is resent only when the connection never reached the server."""
        headers: dict[str, str] = {}
        if auth:
            if not self.api_key:
                raise AuthenticationError(
                    "no API key: pass Client(api_key=...) or set HIVEMART_API_KEY", code="no_api_key"
                )
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key is None and method == "POST" and auth:
            idempotency_key = new_idempotency_key()
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        params = {k: v for k, v in (params or {}).items() if v is not None}
        retry_safe = method in _SAFE_METHODS or idempotency_key is not None

        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.TransportError as e:
                # A failed connect never reached the server, so even an unsafe request may be resent.
                never_sent = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
                if attempt < self.max_retries and (retry_safe or never_sent):
                    delay = self._backoff(attempt, None)
                    logger.info("%s %s failed (%s); retrying in %.2fs", method, path, e.__class__.__name__, delay)
                    self._sleep(delay)
                    attempt += 1
                    continue
                error = APITimeoutError if isinstance(e, httpx.TimeoutException) else APIConnectionError
                raise error(f"{method} {self._http.base_url}{path} failed: {e.__class__.__name__}: {e}") from e

            if response.is_success:
                return response.json() if response.content else None
            retryable = response.status_code == 429 or (
                retry_safe and (response.status_code in _RETRY_STATUSES or _in_progress(response))
            )
            if retryable and attempt < self.max_retries:
                delay = self._backoff(attempt, _retry_after(response))
                logger.info(
                    "%s %s answered %d; retrying in %.2fs (request id %s)",
                    method,
                    path,
                    response.status_code,
                    delay,
                    response.headers.get("X-Request-Id"),
                )
                self._sleep(delay)
                attempt += 1
                continue
            raise error_from_response(response)


def env_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("HIVEMART_API_KEY") or None
