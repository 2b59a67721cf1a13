"""The ``<id:...>`` path converter: object ids in URLs.

Django's ``<int:>`` takes any run of digits, so ``/api/jobs/99999999999999999999/`` reached
the database with a number no bigint column holds (OverflowError on SQLite, a 500). Here a
path id is 1 to 19 ASCII digits up to 2^63 - 1; anything else does not match the route, so
it is the API's 404 in the one error shape.
"""

from __future__ import annotations

from django.urls import register_converter

from marketplace.common.api import INT64_MAX


class IdConverter:
    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 0 < number <= INT64_MAX:
            raise ValueError(f"{value} is not an id")  # Django: the route does not match
        return number

    def to_url(self, value: int) -> str:
        return str(int(value))


def register() -> None:
    """Make ``<id:name>`` available to every URLconf (called when the common app is ready)."""
    register_converter(IdConverter, "id")
