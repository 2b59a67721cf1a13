"""Pieces shared by the apps' API modules: strict input fields, id parsing and permissions.

DRF's number fields accept strings ("10") and floats (10.0) for integers; for money and
block indexes the API takes JSON integers only, so that a client bug shows up as a 400 and
not as a silently rounded amount. Every integer the API reads fits a signed 64-bit column,
and ids in paths and query strings are ASCII digits only (Python's ``int()`` and
``str.isdigit()`` also take "²" or Arabic-Indic digits).
"""

from __future__ import annotations

import math
import re
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from marketplace.common.errors import ValidationFailed

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# 1 to 19 ASCII digits: every id a bigint column can hold (the range is checked after).
_ASCII_ID = re.compile(r"[0-9]{1,19}")


def parse_id(value: Any, field: str) -> int:
    """A positive database id given as text (path or query string): ASCII digits, at most
    2^63 - 1. ValidationFailed otherwise."""
    if not isinstance(value, str) or not _ASCII_ID.fullmatch(value) or not 0 < int(value) <= INT64_MAX:
        raise ValidationFailed(
            f"{field} is an id: a positive integer of ASCII digits below 2^63", extra={"field": field}
        )
    return int(value)


def query_id(request: Request, name: str) -> int | None:
    """The id in query parameter ``name`` (None when absent); see :func:`parse_id`."""
    value = request.query_params.get(name)
    return None if value is None else parse_id(value, name)


@extend_schema_field(OpenApiTypes.INT64)
class StrictIntegerField(serializers.Field):
    """A JSON integer (not a bool, string or float) within [min_value, max_value], which
    default to the signed 64-bit range (what any column can store, on every database)."""

    default_error_messages = {
        "invalid": "A JSON integer is required.",
        "min_value": "Ensure this value is greater than or equal to {min_value}.",
        "max_value": "Ensure this value is less than or equal to {max_value}.",
    }

    def __init__(self, *, min_value: int | None = None, max_value: int | None = None, **kwargs: Any) -> None:
        self.min_value = INT64_MIN if min_value is None else max(min_value, INT64_MIN)
        self.max_value = INT64_MAX if max_value is None else min(max_value, INT64_MAX)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        if not isinstance(data, int) or isinstance(data, bool):
            self.fail("invalid")
        if data < self.min_value:
            self.fail("min_value", min_value=self.min_value)
        if data > self.max_value:
            self.fail("max_value", max_value=self.max_value)
        return data

    def to_representation(self, value: int) -> int:
        return int(value)


@extend_schema_field(OpenApiTypes.DOUBLE)
class StrictFloatField(serializers.Field):
    """A finite JSON number (integer or float, not a bool or string) within [min_value, max_value]."""

    default_error_messages = {
        "invalid": "A finite JSON number is required.",
        "range": "Ensure this value is between {min_value} and {max_value}.",
    }

    def __init__(self, *, min_value: float = 0.0, max_value: float = 1e15, **kwargs: Any) -> None:
        self.min_value, self.max_value = min_value, max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
            self.fail("invalid")
        if not self.min_value <= data <= self.max_value:
            self.fail("range", min_value=self.min_value, max_value=self.max_value)
        return float(data)

    def to_representation(self, value: float) -> float:
        return float(value)


@extend_schema_field(OpenApiTypes.STR)
class HexBytesField(serializers.Field):
    """Bytes sent as lowercase or uppercase hex, of exactly ``length`` bytes."""

    default_error_messages = {"invalid": "Expected {length} bytes as {chars} hex characters."}
    _HEX = re.compile(r"^[0-9a-fA-F]*$")

    def __init__(self, *, length: int, **kwargs: Any) -> None:
        self.length = length
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> bytes:
        if not isinstance(data, str) or len(data) != 2 * self.length or not self._HEX.match(data):
            self.fail("invalid", length=self.length, chars=2 * self.length)
        return bytes.fromhex(data)

    def to_representation(self, value: bytes | str) -> str:
        return value if isinstance(value, str) else value.hex()


class IsStaff(BasePermission):
    message = "staff only"

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


def parse(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    """Validate request data with an input serializer; DRF's ValidationError becomes a 400."""
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)
