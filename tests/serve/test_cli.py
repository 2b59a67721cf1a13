"""``hivemart serve`` as a process: refuses an unguarded free gateway, serves, and stops on
SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from click.testing import CliRunner

from client_sdk.swarm.local import LocalSwarm
from hivemart.cli import cli

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--api-key"),
        (["--api-key", "short"], "at least 16"),
        (["--market", "http://market", "--open"], "drop --api-key/--open"),
    ],
)
def test_a_free_gateway_needs_a_key_or_an_explicit_open(
    tiny_model: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HIVEMART_GATEWAY_KEY", raising=False)
    monkeypatch.delenv("HIVEMART_MARKET_URL", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model), "--initial-peers", PEER, *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.swarm
def test_serve_answers_and_stops_cleanly_on_sigterm(
    tiny_model: Path, two_provider_swarm: LocalSwarm, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-m", "hivemart", "serve", "--model", str(tiny_model), "--open", "--port", str(port)]
    argv += [a for peer in two_provider_swarm.initial_peers for a in ("--initial-peers", peer)]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
        assert models.status_code == 200 and models.json()["data"][0]["hivemart"]["price_per_million_tokens"] == 0
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": models.json()["data"][0]["id"], "prompt": "Hello", "max_tokens": 3, "temperature": 0},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts the app down (lifespan: generations stopped, jobs finished, the swarm
        # left), then re-raises the signal so that the exit status says SIGTERM.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text(), log.read_text()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left behind: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
