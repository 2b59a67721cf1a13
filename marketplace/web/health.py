"""Liveness of what a web process depends on: the database, and what installed apps register
(the scheduler's app registers its Celery broker)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection
from django.db.utils import Error as DatabaseError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def database_check() -> Check:
    """A round trip to the configured database."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as e:
        # The page is public: the error's text (host names, users) goes to the log only.
        logger.warning("health: database unreachable: %s", e)
        return Check("database", False, type(e).__name__)
    return Check("database", True, connection.vendor)


# Checks that apps above the marketplace add (the scheduler's app adds its broker): the web
# process reports what it depends on without importing those apps.
_extra_checks: list[Callable[[], Check]] = []


def health_check_register(check: Callable[[], Check]) -> None:
    """Add ``check`` to ``/healthz`` (called from an app's ``ready()``; idempotent)."""
    if check not in _extra_checks:
        _extra_checks.append(check)


def health_checks() -> list[Check]:
    return [database_check(), *(check() for check in _extra_checks)]
