"""The marketplace commands docs/operators.md and README.md show (``hivemart-market ...``,
marked RUN in ``tests/docs/documented_commands.py``), run as written against a production-like
marketplace: a fresh PostgreSQL database and Redis, with the settings a compose service gets.
(``tests/demo/test_documented_commands.py`` runs them against the demo's SQLite as well.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_deploy import BIN, fresh_database, hivemart_env, redis_url  # noqa: F401 - fixtures
from tests.docs.commands import documented_commands
from tests.docs.documented_commands import COMMANDS, RUN


def _market_commands() -> list[str]:
    return [c for c in documented_commands() if c.startswith("hivemart-market ") and COMMANDS.get(c, ("",))[0] == RUN]


@pytest.mark.slow
def test_operator_commands_run_on_postgresql_and_redis(
    fresh_database: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**hivemart_env(fresh_database, redis_url, home), "PATH": f"{BIN}:/usr/bin:/bin"}

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    commands = _market_commands()
    assert any("verify_ledger" in c for c in commands) and any("grant_credits" in c for c in commands)
    # a fresh database: the documented migrate first (it is among the commands too), and the
    # "existing user" operators.md grants credits to
    for setup in ("hivemart-market migrate --noinput", "hivemart-market create_api_key alice --create"):
        result = shell(setup)
        assert result.returncode == 0, result.stderr[-3000:]
    for command in commands:
        result = shell(command)
        assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stderr[-3000:]}"
    books = shell("hivemart-market verify_ledger --json")
    assert books.returncode == 0 and '"consistent": true' in books.stdout
