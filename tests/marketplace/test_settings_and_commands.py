"""Settings from the environment, and the management commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from marketplace.accounts.services import api_key_authenticate
from marketplace.ledger.selectors import wallet_balance
from tests.marketplace.factories import make_user

PRINT_SETTINGS = (
    "import json, marketplace.settings as s; db = s.DATABASES['default'];"
    "print(json.dumps({'engine': db['ENGINE'], 'name': str(db['NAME']), 'debug': s.DEBUG, 'hosts': s.ALLOWED_HOSTS,"
    " 'fee': s.HIVEMART_PLATFORM_FEE_BPS, 'key': s.SECRET_KEY, 'heartbeat_timeout': s.HIVEMART_HEARTBEAT_TIMEOUT_S}))"
)


def load_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "HIVEMART_PLATFORM_FEE_BPS"}
        and not k.startswith("HIVEMART_HEARTBEAT_")
    }
    clean["HIVEMART_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_defaults_are_sqlite_under_hivemart_home_and_debug_gets_a_random_key(tmp_path: Path) -> None:
    result = load_settings(tmp_path, DEBUG="true")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["engine"] == "django.db.backends.sqlite3"
    assert s["name"] == str(tmp_path / "home" / "marketplace.sqlite3")
    assert s["debug"] is True and len(s["key"]) > 40 and s["fee"] == 500


def test_production_settings_come_from_the_environment(tmp_path: Path) -> None:
    result = load_settings(
        tmp_path,
        DATABASE_URL="postgres://u:p@db.example:5432/market",
        SECRET_KEY="s3cret",
        ALLOWED_HOSTS="market.example, api.example",
        HIVEMART_PLATFORM_FEE_BPS="250",
    )
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert (s["engine"], s["name"]) == ("django.db.backends.postgresql", "market")
    assert (s["debug"], s["key"], s["hosts"], s["fee"]) == (False, "s3cret", ["market.example", "api.example"], 250)


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "SECRET_KEY"),
        ({"SECRET_KEY": "x", "HIVEMART_PLATFORM_FEE_BPS": "12.5"}, "not an integer"),
        ({"SECRET_KEY": "x", "HIVEMART_PLATFORM_FEE_BPS": "10001"}, "outside"),
        ({"SECRET_KEY": "x", "DEBUG": "maybe"}, "not a boolean"),
        # a timeout shorter than three heartbeat periods makes healthy providers flap offline
        ({"SECRET_KEY": "x", "HIVEMART_HEARTBEAT_PERIOD_S": "15", "HIVEMART_HEARTBEAT_TIMEOUT_S": "6"}, "3 x"),
        ({"SECRET_KEY": "x", "HIVEMART_HEARTBEAT_PERIOD_S": "30"}, None),
    ],
)
def test_unsafe_or_malformed_settings_refuse_to_load(tmp_path: Path, env: dict, message: str | None) -> None:
    result = load_settings(tmp_path, **env)
    if message is None:  # the default timeout follows the period (4 x)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["heartbeat_timeout"] == 120
    else:
        assert result.returncode != 0 and message in result.stderr


@pytest.mark.django_db
def test_create_api_key_and_grant_credits_commands() -> None:
    out = StringIO()
    call_command("create_api_key", "ops", "--create", "--staff", stdout=out)
    key = api_key_authenticate(raw=out.getvalue().strip())
    assert key.user.username == "ops" and key.user.is_staff
    with pytest.raises(CommandError):
        call_command("create_api_key", "nobody")

    user = make_user(username="carol")
    call_command("grant_credits", "carol", "2500000", "--idempotency-key", "welcome", stdout=StringIO())
    call_command("grant_credits", "carol", "2500000", "--idempotency-key", "welcome", stdout=StringIO())
    assert wallet_balance(user=user) == 2_500_000
    with pytest.raises(CommandError):
        call_command("grant_credits", "carol", "0")
