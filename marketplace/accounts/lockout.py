"""Password login lockout, shared by every web worker through the cache.

Each failed password login counts against three keys: the (username, client address) pair,
the address alone and the username alone. A key that reaches its limit within
``HIVEMART_LOGIN_LOCKOUT_S`` is locked for that long, and a locked key refuses logins without
looking at the password, so guessing on stops paying:

| key | limit | stops |
|---|---|---|
| username + address | ``HIVEMART_LOGIN_FAILURES`` | one client guessing one account's password |
| address | 4x that | one client spraying passwords over many usernames |
| username | 20x that | many addresses guessing one account (high, so a stranger cannot easily lock its owner out) |

The counts live in the default cache (Redis in production, a database table on the embedded
default; never per process), so N gunicorn workers do not allow N times the limit. A
successful login clears its (username, address) count.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Any

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache, caches
from django.core.cache.backends.db import DatabaseCache
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest
from rest_framework.throttling import BaseThrottle

__all__ = ["client_address", "login_locked", "login_failure_record", "login_success_record", "LockoutModelBackend"]

# Limits of the address and username keys, as multiples of HIVEMART_LOGIN_FAILURES.
_ADDRESS_FACTOR = 4
_USERNAME_FACTOR = 20


def client_address(request: HttpRequest) -> str:
    """The client's address as the API's throttles see it (X-Forwarded-For only behind
    ``HIVEMART_PROXY_HOPS`` proxies)."""
    return BaseThrottle().get_ident(request) or "unknown"


def _keys(username: str, address: str) -> list[tuple[str, int]]:
    """(cache key stem, failure limit) per counted key. Usernames are hashed: any characters are
    safe in a key, and case variants of one name count together."""
    name = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
    where = hashlib.sha256(address.encode()).hexdigest()[:32]
    base = settings.HIVEMART_LOGIN_FAILURES
    return [
        (f"login:pair:{name}:{where}", base),
        (f"login:addr:{where}", base * _ADDRESS_FACTOR),
        (f"login:user:{name}", base * _USERNAME_FACTOR),
    ]


def login_locked(*, username: str, address: str) -> bool:
    """Whether logins as ``username`` from ``address`` are locked out now."""
    return any(v is not None for v in cache.get_many([f"{k}:locked" for k, _ in _keys(username, address)]).values())


def _count(key: str, window_s: int) -> int:
    """Add one failure to ``key`` (which expires ``window_s`` after its first failure)."""
    if cache.add(key, 1, timeout=window_s):
        return 1
    try:
        return cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.add(key, 1, timeout=window_s)
        return 1


def login_failure_record(*, username: str, address: str) -> None:
    """Count a failed login; lock every key that reached its limit."""
    window = settings.HIVEMART_LOGIN_LOCKOUT_S
    # The database cache's incr is a read then a write: inside one transaction (IMMEDIATE on
    # SQLite, which takes the write lock first) two workers cannot both read the same count.
    with transaction.atomic() if isinstance(caches["default"], DatabaseCache) else nullcontext():
        for key, limit in _keys(username, address):
            if _count(key, window) >= limit:
                cache.set(f"{key}:locked", 1, timeout=window)


def login_success_record(*, username: str, address: str) -> None:
    """A correct password from this address: its failures for this username no longer count."""
    pair, _ = _keys(username, address)[0]
    cache.delete(pair)


class LockoutModelBackend(ModelBackend):
    """Django's username/password backend behind the lockout: a locked-out (username, address)
    is refused before the password is checked, and every wrong password is counted. Serves
    the web login and the admin's alike."""

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> Any:
        if request is None or username is None or password is None:
            # Not a login over HTTP (a management command, a test client's login()): nothing to throttle.
            return super().authenticate(request, username=username, password=password, **kwargs)
        address = client_address(request)
        if login_locked(username=username, address=address):
            request.login_locked = True  # type: ignore[attr-defined]
            raise PermissionDenied("too many failed logins")  # stops authenticate() at this backend
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            login_failure_record(username=username, address=address)
            request.login_locked = login_locked(username=username, address=address)  # type: ignore[attr-defined]
        else:
            login_success_record(username=username, address=address)
        return user
