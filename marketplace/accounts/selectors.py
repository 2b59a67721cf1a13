"""Reads for users and API keys."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.accounts.models import ApiKey, User
from marketplace.common.errors import NotFound


def api_keys_visible_to(*, user: User) -> QuerySet[ApiKey]:
    """A user's own keys; staff see every key."""
    keys = ApiKey.objects.select_related("user")
    return keys if user.is_staff else keys.filter(user=user)


def api_key_get(*, user: User, key_id: int) -> ApiKey:
    try:
        return api_keys_visible_to(user=user).get(pk=key_id)
    except ApiKey.DoesNotExist:
        raise NotFound(f"no API key {key_id}") from None
