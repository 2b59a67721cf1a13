"""``@pytest.mark.redis`` tests need a Redis server: they run when REDIS_URL is set (as
scripts/test and CI set it) and are skipped, with the reason, otherwise."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _redis_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("redis") is not None and not os.environ.get("REDIS_URL"):
        pytest.skip("needs a Redis server: set REDIS_URL=redis://127.0.0.1:6379/0 (scripts/test does)")
