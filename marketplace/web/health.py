"""Liveness of what a web process depends on: the database and the Celery broker."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import connection
from django.db.utils import Error as DatabaseError

logger = logging.getLogger(__name__)

# Short: a load balancer polls this, and a broker that takes longer than this is not healthy.
BROKER_TIMEOUT_S = 2.0


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


def broker_check() -> Check:
    """A connection to the scheduler's broker (Redis at REDIS_URL, else the embedded one)."""
    from scheduler.celery import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            transport = conn.transport_cls
    except Exception as e:  # noqa: BLE001 - kombu raises transport-specific errors; any of them means down
        logger.warning("health: broker unreachable: %s", e)
        return Check("broker", False, type(e).__name__)
    return Check("broker", True, str(transport))


def health_checks() -> list[Check]:
    return [database_check(), broker_check()]
