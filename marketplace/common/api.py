"""Pieces shared by the apps' API modules: strict input fields and permissions.

DRF's number fields accept strings ("10") and floats (10.0) for integers; for money and
block indexes the API takes JSON integers only, so that a client bug shows up as a 400 and
not as a silently rounded amount.
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


@extend_schema_field(OpenApiTypes.INT64)
class StrictIntegerField(serializers.Field):
    """A JSON integer (not a bool, string or float) within [min_value, max_value]."""

    default_error_messages = {
        "invalid": "A JSON integer is required.",
        "min_value": "Ensure this value is greater than or equal to {min_value}.",
        "max_value": "Ensure this value is less than or equal to {max_value}.",
    }

    def __init__(self, *, min_value: int | None = None, max_value: int | None = None, **kwargs: Any) -> None:
        self.min_value, self.max_value = min_value, max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        if not isinstance(data, int) or isinstance(data, bool):
            self.fail("invalid")
        if self.min_value is not None and data < self.min_value:
            self.fail("min_value", min_value=self.min_value)
        if self.max_value is not None and data > self.max_value:
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
