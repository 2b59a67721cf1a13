"""The SDK's error tree. Everything it raises on purpose derives from :class:`HivemartError`.

- :class:`ModelError`: a checkpoint is missing, malformed or of an unsupported architecture.
- :class:`ProtocolError`: a message on the wire is malformed (bad framing, shapes, dtypes, sizes).
- :class:`SwarmError`: the swarm cannot do what was asked; subclasses say what to do next.
- API errors (HTTP status, machine-readable code, request id) live in the section below.
"""

from __future__ import annotations

from typing import Any


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
        message += f"; {hint}" if hint else f"; start one with `hivemart-provider run --model {model_id} --blocks {start}:{end}`"
        super().__init__(message)


class RemoteError(SwarmError):
    """A provider answered a request with an error.

    ``code`` is the provider's machine-readable reason (``bad_request``, ``unknown_session``,
    ``cache_full``, ...); ``peer_id`` says which provider answered.
    """

    def __init__(self, code: str, message: str, *, peer_id: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.code, self.peer_id, self.extra = code, peer_id, extra or {}
        where = f" (provider {peer_id})" if peer_id else ""
        super().__init__(f"{code}: {message}{where}")


class ProviderUnavailableError(SwarmError):
    """A provider did not answer, or its connection broke, while serving a request."""

    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"provider {peer_id} is unavailable: {reason}")


# --- marketplace REST API -----------------------------------------------------------------
# (API errors: APIError and its subclasses, defined below by the REST client.)
