"""``Authorization: Bearer hm_...`` for DRF."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.services import api_key_authenticate
from marketplace.common.errors import AuthenticationFailed


class ApiKeyAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiKey] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None  # not ours: let session authentication try
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("malformed Authorization header; expected 'Bearer <api key>'")
        try:
            raw = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("malformed API key") from None
        try:
            key = api_key_authenticate(raw=raw)
        except AuthenticationFailed as e:
            raise exceptions.AuthenticationFailed(e.message) from None
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="hivemart"'


def request_api_key(request: Any) -> ApiKey | None:
    """The API key a request authenticated with, if any."""
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, ApiKey) else None
