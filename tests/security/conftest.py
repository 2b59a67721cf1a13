"""Shared pieces of the adversarial suite: an attacker and a victim talk to the real app over
its public HTTP API (DRF's APIClient through every middleware), on whichever database the run
is configured with (PostgreSQL with ``DATABASE_URL=postgres://...``, SQLite without)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.marketplace.settlement import platform_key_file


@pytest.fixture(autouse=True)
def _platform_key(settings: Any, tmp_path: Path) -> None:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
