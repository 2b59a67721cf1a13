"""The platform's Ed25519 key, which signs job tickets.

Read from ``HIVEMART_PLATFORM_KEY_FILE`` (libp2p key encoding, as provider identities are
stored), created there on first use. Every marketplace process (web, workers) must use the
same file; providers trust its public key (``GET /api/platform/``).
"""

from __future__ import annotations

import threading
from pathlib import Path

from django.conf import settings

from hivemart_core.protocol.identity import Identity

__all__ = ["platform_identity"]

_lock = threading.Lock()
_cache: dict[Path, Identity] = {}


def platform_identity() -> Identity:
    """The platform key named by the settings (cached per path)."""
    path = Path(settings.HIVEMART_PLATFORM_KEY_FILE)
    with _lock:
        identity = _cache.get(path)
        if identity is None:
            try:
                identity = Identity.load_or_create(path)
            except FileExistsError:  # another process created it between our check and our write
                identity = Identity.load(path)
            _cache[path] = identity
        return identity
