"""Headers of the swarm RPCs, as small dataclasses with explicit validation.

Every request a provider reads from the network goes through ``from_header``, which checks
types, ranges and lengths and raises :class:`ProtocolError` with a message fit to send back.
Tensor checks that need the server's state (hidden size, dtype, span) happen in the server.

RPC names (libp2p protocol handlers):
- ``hivemart.info``      request ``{}`` -> ``ServerInfo`` header
- ``hivemart.forward``   ``SpanRequest`` + hidden[b, t, h] -> hidden[b, t, h]
- ``hivemart.backward``  ``SpanRequest`` + hidden, grad_output -> grad_input
- ``hivemart.inference`` bidirectional: ``OpenSession``, then ``Step`` + hidden per step
- ``hivemart.push``      provider to provider: ``Step`` + hidden for the next span of a chain
Errors come back as ``{"type": "error", "code": ..., "message": ..., "step_id": ...}``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from client_sdk.errors import ProtocolError

__all__ = [
    "RPC_INFO", "RPC_FORWARD", "RPC_BACKWARD", "RPC_INFERENCE", "RPC_PUSH",
    "OpenSession", "Step", "Relink", "SpanRequest", "error_header",
]

RPC_INFO = "hivemart.info"
RPC_FORWARD = "hivemart.forward"
RPC_BACKWARD = "hivemart.backward"
RPC_INFERENCE = "hivemart.inference"
RPC_PUSH = "hivemart.push"

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")  # base58btc
_MAX_INT = 2**31 - 1


def _int(header: dict[str, Any], key: str, *, low: int = 0, high: int = _MAX_INT) -> int:
    value = header.get(key)
    if type(value) is not int:  # bool is an int subclass: reject it too
        raise ProtocolError(f"'{key}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"'{key}' must be in [{low}, {high}], got {value}")
    return value


def _optional_str(header: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str | None:
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"'{key}' must be {what}")
    return value


def _session_id(header: dict[str, Any], key: str = "session_id") -> str:
    value = _optional_str(header, key, _SESSION_ID, "8 to 64 characters of [A-Za-z0-9_-]")
    if value is None:
        raise ProtocolError(f"'{key}' is required")
    return value


def _span(header: dict[str, Any]) -> tuple[int, int]:
    start, end = _int(header, "start"), _int(header, "end")
    if end <= start:
        raise ProtocolError(f"empty block range {start}:{end}")
    return start, end


def error_header(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


@dataclass(frozen=True)
class SpanRequest:
    """A forward or backward over blocks [start, end) of the provider's span."""

    start: int
    end: int

    def to_header(self) -> dict[str, Any]:
        return {"type": "span", **asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "SpanRequest":
        return cls(*_span(header))


@dataclass(frozen=True)
class OpenSession:
    """First message of an inference stream.

    ``next_peer``/``next_session`` name the provider of the following span: the server
    pushes each step's output there directly instead of through the client. ``prev_peer``
    is the only peer allowed to push steps into this session. ``return_outputs`` asks for
    every step's output on this stream too (the last span of a chain always returns it).
    """

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    prev_peer: str | None = None
    next_peer: str | None = None
    next_session: str | None = None
    return_outputs: bool = True

    def to_header(self) -> dict[str, Any]:
        return {"type": "open", **asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "OpenSession":
        if header.get("type") != "open":
            raise ProtocolError("an inference stream must start with an 'open' message")
        start, end = _span(header)
        next_peer = _optional_str(header, "next_peer", _PEER_ID, "a base58 peer id")
        next_session = None if next_peer is None else _session_id(header, "next_session")
        return_outputs = header.get("return_outputs", True)
        if not isinstance(return_outputs, bool):
            raise ProtocolError("'return_outputs' must be a boolean")
        return cls(
            session_id=_session_id(header), start=start, end=end,
            max_length=_int(header, "max_length", low=1),
            batch_size=_int(header, "batch_size", low=1),
            prev_peer=_optional_str(header, "prev_peer", _PEER_ID, "a base58 peer id"),
            next_peer=next_peer, next_session=next_session,
            return_outputs=return_outputs or next_peer is None,
        )


@dataclass(frozen=True)
class Step:
    """One inference step: hidden states for positions ``position ..`` of a session.

    ``step_id`` identifies the step so that a step delivered twice (pushed by the previous
    provider and re-sent by the client) is applied once. A ``position`` below the session's
    length rolls the cache back to it first; one above it is an error.
    """

    session_id: str
    step_id: int
    position: int

    def to_header(self) -> dict[str, Any]:
        return {"type": "step", **asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "Step":
        if header.get("type") != "step":
            raise ProtocolError(f"expected a 'step' message, got {header.get('type')!r}")
        return cls(session_id=_session_id(header), step_id=_int(header, "step_id", high=2**62),
                   position=_int(header, "position"))


@dataclass(frozen=True)
class Relink:
    """Re-wires an open session after a neighbour in the chain was replaced.

    Sent by the session's client on its own stream: ``prev_peer`` becomes the only peer
    allowed to push steps here; ``next_peer``/``next_session`` (both or neither) become
    where outputs are pushed. A field left out keeps its value; ``clear_next`` stops pushing.
    """

    session_id: str
    prev_peer: str | None = None
    next_peer: str | None = None
    next_session: str | None = None
    clear_next: bool = False

    def to_header(self) -> dict[str, Any]:
        return {"type": "relink", **asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "Relink":
        if header.get("type") != "relink":
            raise ProtocolError(f"expected a 'relink' message, got {header.get('type')!r}")
        next_peer = _optional_str(header, "next_peer", _PEER_ID, "a base58 peer id")
        clear_next = header.get("clear_next", False)
        if not isinstance(clear_next, bool) or (clear_next and next_peer is not None):
            raise ProtocolError("'clear_next' must be a boolean and excludes 'next_peer'")
        return cls(session_id=_session_id(header),
                   prev_peer=_optional_str(header, "prev_peer", _PEER_ID, "a base58 peer id"),
                   next_peer=next_peer, next_session=None if next_peer is None else _session_id(header, "next_session"),
                   clear_next=clear_next)
