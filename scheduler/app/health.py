"""The broker's line in ``/healthz``: registered with the marketplace's health page by the
scheduler's app, since the broker is the scheduler's."""

from __future__ import annotations

import logging

from marketplace.web.health import Check

logger = logging.getLogger(__name__)

# Short: a load balancer polls this, and a broker that takes longer than this is not healthy.
BROKER_TIMEOUT_S = 2.0


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
