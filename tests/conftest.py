"""Suite-wide test configuration.

Django is configured for every test (``marketplace.settings_test``) but only tests that ask
for the database touch it, so the model and swarm tests need neither PostgreSQL nor SQLite.

``@pytest.mark.postgres`` tests run whenever the configured database is PostgreSQL
(``DATABASE_URL=postgres://...``, as in CI) and are skipped, with the reason, otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from client_sdk.swarm.local import LocalSwarm

# The model the swarm and fine-tuning tests serve: small enough that agents start in seconds.
TINY = dict(arch="llama", hidden=64, layers=4, seed=0, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hivemart_core.models import create_model

    return create_model(tmp_path_factory.mktemp("models") / "tiny-llama", **TINY)


@pytest.fixture(scope="session")
def two_provider_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """A bootstrap node and two agents serving ``tiny_model``'s blocks 0:2 and 2:4, started once for the
    whole session: starting agents is most of a swarm test's time. Tests that use it only send it
    requests (never stop or reconfigure its agents); one that needs to do that starts its own swarm."""
    from tests.swarm.conftest import start_swarm

    swarm = start_swarm(tiny_model, [(0, 2), (2, 4)], tmp_path_factory.mktemp("swarm2"))
    yield swarm
    swarm.stop()


@pytest.fixture(autouse=True)
def _postgres_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("postgres") is None:
        return
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (DATABASE_URL=postgres://...); the configured database is {connection.vendor}")


@pytest.fixture
def wsgi(db: None) -> Iterator[httpx.WSGITransport]:
    """An httpx transport into the Django app in this process, inside the test's transaction
    (for ``hivemart_core.api.Client(transport=wsgi, base_url="http://testserver")``)."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    # Django closes the database connection around each request; inside a test's transaction
    # that would end the test's transaction, so (as Django's own test client does) don't.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield httpx.WSGITransport(app=WSGIHandler())
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
