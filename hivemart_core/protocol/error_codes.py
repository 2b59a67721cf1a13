"""Every error code a provider answers with, in one table, with what a caller may do about it.

A provider's error reply is ``{"type": "error", "code": ..., "message": ...}``. ``code`` is one of
the constants below; :data:`ERROR_CODES` says, for each, whether retrying can help and where:

- ``Retry.OTHER_PROVIDER``: the provider (or its chain) cannot serve this now; another may.
- ``Retry.SAME_PROVIDER``: the caller can fix a precondition and ask the same provider again
  (an adapter the provider forgot is created again).
- ``Retry.NO``: the request itself is wrong (shapes, limits, tickets): raise it to the caller.

``provider_limit`` marks refusals over one provider's own configured limits: another provider
may be configured with larger ones, so a client opening a session may skip to it. Callers
(``client_sdk.swarm.session``, ``client_sdk.swarm.remote``) decide with :func:`retry_for`,
never with lists of their own; a code missing from the table (a newer provider's) is ``Retry.NO``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["Retry", "ErrorCode", "ERROR_CODES", "retry_for", "is_ticket_error", "is_provider_limit"]


class Retry(enum.Enum):
    NO = "no"
    SAME_PROVIDER = "same_provider"
    OTHER_PROVIDER = "other_provider"


# Malformed or impossible requests (framing and headers).
BAD_REQUEST: Final = "bad_request"
TOO_LARGE: Final = "too_large"
TIMEOUT: Final = "timeout"
BAD_SHAPE: Final = "bad_shape"
BAD_DTYPE: Final = "bad_dtype"
BAD_VALUE: Final = "bad_value"
BAD_SPAN: Final = "bad_span"
UNSUPPORTED_VERSION: Final = "unsupported_version"
# Inference sessions and push chains.
BAD_POSITION: Final = "bad_position"
TOO_LONG: Final = "too_long"
UNKNOWN_SESSION: Final = "unknown_session"
SESSION_EXISTS: Final = "session_exists"
STALE_STEP: Final = "stale_step"
NEXT_HOP_FAILED: Final = "next_hop_failed"
BAD_PUSH: Final = "bad_push"
# The provider's state.
BUSY: Final = "busy"
CACHE_FULL: Final = "cache_full"
NOT_ACCEPTING: Final = "not_accepting"
INTERNAL: Final = "internal"
# Fine-tuning adapters.
UNKNOWN_ADAPTER: Final = "unknown_adapter"
ADAPTER_EXISTS: Final = "adapter_exists"
ADAPTER_MEMORY_FULL: Final = "adapter_memory_full"
# Tickets and the payment channel.
TICKET_REQUIRED: Final = "ticket_required"
BAD_TICKET: Final = "bad_ticket"
TICKET_SIGNATURE: Final = "ticket_signature"
TICKET_EXPIRED: Final = "ticket_expired"
TICKET_WRONG_PROVIDER: Final = "ticket_wrong_provider"
TICKET_BLOCKS: Final = "ticket_blocks"
TICKET_EXHAUSTED: Final = "ticket_exhausted"
ACK_OVERDUE: Final = "ack_overdue"
BAD_ACK: Final = "bad_ack"


@dataclass(frozen=True)
class ErrorCode:
    code: str
    retry: Retry
    description: str
    provider_limit: bool = False
    ticket: bool = False


_NO, _SAME, _OTHER = Retry.NO, Retry.SAME_PROVIDER, Retry.OTHER_PROVIDER

_TABLE: tuple[ErrorCode, ...] = (
    ErrorCode(BAD_REQUEST, _NO, "a malformed message or header"),
    ErrorCode(TOO_LARGE, _NO, "over a size limit of this provider (batch, tokens, rank)", provider_limit=True),
    ErrorCode(TIMEOUT, _OTHER, "a message stalled halfway on the wire"),
    ErrorCode(BAD_SHAPE, _NO, "a tensor of the wrong shape"),
    ErrorCode(BAD_DTYPE, _NO, "a tensor of another dtype than the provider computes in"),
    ErrorCode(BAD_VALUE, _NO, "a tensor with NaN or infinite values"),
    ErrorCode(BAD_SPAN, _NO, "blocks outside the provider's span or the adapter's"),
    ErrorCode(UNSUPPORTED_VERSION, _NO, "a request on a protocol version the provider does not speak"),
    ErrorCode(BAD_POSITION, _NO, "a step that skips positions of its session"),
    ErrorCode(TOO_LONG, _NO, "a session longer than the provider allows", provider_limit=True),
    ErrorCode(UNKNOWN_SESSION, _OTHER, "no such session here (expired, or the provider restarted)"),
    ErrorCode(SESSION_EXISTS, _NO, "a session id already open on this provider"),
    ErrorCode(STALE_STEP, _NO, "a step id not above the last one computed"),
    ErrorCode(NEXT_HOP_FAILED, _OTHER, "the next provider of the chain could not be reached or refused"),
    ErrorCode(BAD_PUSH, _OTHER, "the previous provider pushed a step without a valid record"),
    ErrorCode(BUSY, _OTHER, "the provider (or the caller's share of it) is at capacity"),
    ErrorCode(CACHE_FULL, _OTHER, "no attention cache left for the session"),
    ErrorCode(NOT_ACCEPTING, _OTHER, "the provider is shutting down or moving"),
    ErrorCode(INTERNAL, _OTHER, "the provider failed on its side"),
    ErrorCode(UNKNOWN_ADAPTER, _SAME, "no such adapter for this peer: create it again"),
    ErrorCode(ADAPTER_EXISTS, _NO, "an adapter id already in use"),
    ErrorCode(ADAPTER_MEMORY_FULL, _OTHER, "no adapter memory left on the provider"),
    ErrorCode(TICKET_REQUIRED, _NO, "the provider serves paid jobs only", ticket=True),
    ErrorCode(BAD_TICKET, _NO, "a malformed job ticket", ticket=True),
    ErrorCode(TICKET_SIGNATURE, _NO, "a ticket not signed by the platform key", ticket=True),
    ErrorCode(TICKET_EXPIRED, _NO, "an expired ticket", ticket=True),
    ErrorCode(TICKET_WRONG_PROVIDER, _NO, "a ticket for another provider", ticket=True),
    ErrorCode(TICKET_BLOCKS, _NO, "blocks outside the ticket's", ticket=True),
    ErrorCode(TICKET_EXHAUSTED, _NO, "no work units left on the ticket", ticket=True),
    # The client withholds acks (it refused the provider's receipts): move to another provider.
    ErrorCode(ACK_OVERDUE, _OTHER, "the client's acks lag beyond the ticket's credit window"),
    ErrorCode(BAD_ACK, _NO, "an acknowledgement that is not a countersigned receipt"),
)

ERROR_CODES: Final[Mapping[str, ErrorCode]] = {entry.code: entry for entry in _TABLE}


def retry_for(code: str) -> Retry:
    """What retrying a request answered with ``code`` can achieve (unknown codes: nothing)."""
    entry = ERROR_CODES.get(code)
    return Retry.NO if entry is None else entry.retry


def is_ticket_error(code: str) -> bool:
    entry = ERROR_CODES.get(code)
    return entry is not None and entry.ticket


def is_provider_limit(code: str) -> bool:
    entry = ERROR_CODES.get(code)
    return entry is not None and entry.provider_limit
