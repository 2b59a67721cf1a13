"""Suite-wide test configuration.

Django is configured for every test (``marketplace.settings_test``) but only tests that ask
for the database touch it, so the model and swarm tests need neither PostgreSQL nor SQLite.

``@pytest.mark.postgres`` tests run whenever the configured database is PostgreSQL
(``DATABASE_URL=postgres://...``, as in CI) and are skipped, with the reason, otherwise.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _postgres_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("postgres") is None:
        return
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (DATABASE_URL=postgres://...); the configured database is {connection.vendor}")
