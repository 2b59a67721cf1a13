"""Writes for users and API keys."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.accounts.models import ApiKey, User
from marketplace.common.errors import AuthenticationFailed, Conflict, PermissionDenied, ValidationFailed

KEY_PREFIX = "hm_"
_PREFIX_HEX = 12
# hm_ + 12 hex (the visible prefix) + _ + 43 urlsafe base64 characters (32 random bytes).
_KEY_RE = re.compile(r"^hm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{3,150}$")
# Writing last_used_at on every request would turn every read into a write.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class CreatedApiKey:
    """A freshly created key. ``raw`` exists only here: it is never stored nor shown again."""

    key: ApiKey
    raw: str


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def user_create(*, username: str, password: str | None = None, email: str = "", is_staff: bool = False) -> User:
    """Create a user. ``password=None`` makes an API-only user that cannot log in to the web."""
    if not _USERNAME_RE.match(username):
        raise ValidationFailed("a username has 3 to 150 letters, digits or . @ + - _", extra={"field": "username"})
    user = User(username=username, email=email, is_staff=is_staff)
    if password is None:
        user.set_unusable_password()
    else:
        try:
            validate_password(password, user)
        except DjangoValidationError as e:
            raise ValidationFailed("password rejected", extra={"field": "password", "reasons": e.messages}) from None
        user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        raise Conflict(f"the username {username!r} is taken", extra={"field": "username"}) from None
    return user


def api_key_create(*, user: User, name: str = "") -> CreatedApiKey:
    """Create an API key for ``user``; the returned ``raw`` key is the only copy."""
    if len(name) > 100:
        raise ValidationFailed("a key name has at most 100 characters", extra={"field": "name"})
    for _ in range(5):
        prefix = secrets.token_hex(_PREFIX_HEX // 2)
        raw = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(user=user, name=name, prefix=prefix, secret_hash=_hash(raw))
        except IntegrityError:  # a prefix collision: 48 random bits make this rare, retrying makes it moot
            continue
        return CreatedApiKey(key=key, raw=raw)
    raise Conflict("could not allocate a unique key prefix; try again")


def api_key_revoke(*, key: ApiKey, by: User) -> ApiKey:
    """Revoke ``key`` (its owner or staff). Revoking twice is harmless."""
    if key.user_id != by.id and not by.is_staff:
        raise PermissionDenied("you may revoke only your own keys")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def api_key_authenticate(*, raw: str) -> ApiKey:
    """The active key matching ``raw``, or AuthenticationFailed (malformed, unknown or revoked)."""
    match = _KEY_RE.match(raw)
    if not match:
        raise AuthenticationFailed("malformed API key; expected hm_<12 hex>_<43 characters>")
    key = ApiKey.objects.select_related("user").filter(prefix=match.group(1)).first()
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(raw)):
        raise AuthenticationFailed("unknown API key")
    if key.revoked_at is not None:
        raise AuthenticationFailed("this API key was revoked")
    if not key.user.is_active:
        raise AuthenticationFailed("this user is deactivated")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > _LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


@transaction.atomic
def user_signup(*, username: str, password: str, email: str = "") -> tuple[User, CreatedApiKey]:
    """Self-service sign-up: a user with a password (for the web) and a first API key."""
    user = user_create(username=username, password=password, email=email)
    return user, api_key_create(user=user, name="first key")
