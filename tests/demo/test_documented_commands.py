"""The commands README.md and docs/ show (``tests/docs/documented_commands.py``, those marked
RUN), run as written, in the order the docs give them, against the kept demo: only the
placeholders (URL, KEY, MADDR, MODEL_ID, ID, OUT) become that demo's values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.demo.conftest import KeptDemo
from tests.docs.commands import documented_commands
from tests.docs.documented_commands import COMMANDS, PLACEHOLDERS, RUN

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

_PLACEHOLDER = re.compile(r"\b(" + "|".join(sorted(PLACEHOLDERS, key=len, reverse=True)) + r")\b")


def _shell(command: str, *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_documented_commands_run_against_the_demo(kept_demo: KeptDemo) -> None:
    summary = kept_demo.summary
    values = {
        "URL": summary["web"],
        "KEY": summary["client_api_key"],
        "MADDR": summary["swarm"],
        "MODEL_ID": summary["model"],
        "OUT": str(kept_demo.cwd / "model-out"),
    }
    bin_dir = str(Path(sys.executable).parent)  # where `pip install` put hivemart, hivemart-market, ...
    cli_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HIVEMART_CONFIG": str(kept_demo.cwd / "cli-config.json"),
    }
    for name in ("HIVEMART_URL", "HIVEMART_API_KEY", "HIVEMART_HOME", "HIVEMART_INITIAL_PEERS"):
        cli_env.pop(name, None)
    market_env = {**kept_demo.market_env(), "PATH": cli_env["PATH"]}
    # operators.md grants credits to "an existing user"
    assert _shell("hivemart-market create_api_key alice --create", cwd=kept_demo.cwd, env=market_env).returncode == 0

    ran = []
    for written in documented_commands():
        if COMMANDS.get(written, ("", ""))[0] != RUN:
            continue
        command = _PLACEHOLDER.sub(lambda m: values[m.group(1)], written)
        env = market_env if written.startswith("hivemart-market") else cli_env
        started = time.monotonic()
        result = _shell(command, cwd=kept_demo.cwd, env=env)
        print(f"{time.monotonic() - started:6.1f} s  {command}")  # shown with -rA: where the time goes
        assert result.returncode == 0, (
            f"`{command}` failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        created = re.search(r"job (\d+) created", result.stdout)
        if created:
            values["ID"] = created.group(1)
        ran.append(written)
    assert len(ran) == sum(1 for how, _ in COMMANDS.values() if how == RUN)
    assert "ID" in values  # `jobs create` printed the id the next command runs


def test_generate_without_paid_against_market_providers_says_what_to_do(kept_demo: KeptDemo) -> None:
    """The demo's providers sell through the marketplace: a free run is refused by them
    (ticket_required), and the CLI names the flag that make it a paid one."""
    model = kept_demo.home / "models" / "demo-llama"
    result = subprocess.run(
        [sys.executable, "-m", "hivemart", "generate", "Hello", "--model", str(model)]
        + ["--initial-peers", kept_demo.summary["swarm"], "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "HIVEMART_API_KEY"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "paid jobs only" in result.stderr and "--paid" in result.stderr, result.stderr[-3000:]
