"""Hivemart client SDK: the REST client, the wire protocol, model loading and the swarm client.

Importing ``client_sdk`` is cheap: the REST client needs neither torch nor hivemind, and the
swarm and model modules import them only when used (``client_sdk.swarm``, ``hivemart_core.models``).
"""

from typing import TYPE_CHECKING, Any

from hivemart_core.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    HivemartError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ValidationError,
)

if TYPE_CHECKING:
    from hivemart_core.api import Client

__all__ = [
    "Client",
    "HivemartError",
    "APIError",
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "ConflictError",
    "InsufficientCreditsError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``client_sdk.Client`` loads the REST client (and httpx) on first use, so that importing
    # client_sdk for the CLI or the swarm does not pay for it.
    if name == "Client":
        from hivemart_core.api import Client

        return Client
    raise AttributeError(f"module 'client_sdk' has no attribute {name!r}")
