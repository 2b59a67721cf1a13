"""A provider started with exactly the command the Sell page shows, against the kept demo,
comes online and stays online across more than one heartbeat timeout: the page's
--heartbeat-period is what the market's timeout (HIVEMART_HEARTBEAT_TIMEOUT_S) is set for,
its --initial-peers the demo's bootstrap node, its --num-blocks fits the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hivemart.demo.scenario import market_env
from hivemart_core.api import Client
from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity
from tests.demo.conftest import KeptDemo
from tests.web.sell_page import sell_argv, sell_command_text, sell_env

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def _state(client: Client, identity: Path) -> str | None:
    """The state of the provider whose key the agent made at ``identity`` (None: not yet there)."""
    if not identity.exists():
        return None
    try:
        peer_id = Identity.load(identity).peer_id
    except (OSError, ProtocolError):
        return None  # being written
    return next((p.state for p in client.providers.iter() if p.peer_id == peer_id), None)


def test_an_agent_started_from_the_sell_page_stays_online(kept_demo: KeptDemo, tmp_path: Path) -> None:
    summary = kept_demo.summary
    body = httpx.get(summary["web"] + "/sell/", timeout=10).text
    argv, shown_env = sell_argv(body), sell_env(body)
    assert argv[argv.index("--initial-peers") + 1] == summary["swarm"]
    assert argv[argv.index("--num-blocks") + 1] == "6"  # the demo model has 6 blocks
    period = int(argv[argv.index("--heartbeat-period") + 1])
    timeout = int(market_env()["HIVEMART_HEARTBEAT_TIMEOUT_S"])
    assert timeout >= 3 * period

    anonymous = Client(base_url=summary["web"])
    key = anonymous.accounts.signup(username="seller", password="a seller's long password").api_key.key
    anonymous.close()
    # `.venv/bin/hivemart-provider` as the page says: this checkout's installed script
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "hivemart-provider").symlink_to(Path(sys.executable).parent / "hivemart-provider")
    assert set(shown_env) == {"HIVEMART_API_KEY", "HIVEMART_MODEL"}  # the swarm is on loopback: no PUBLIC_IP
    env = {
        **os.environ,
        "HIVEMART_API_KEY": key,
        "HIVEMART_MODEL": str(kept_demo.home / "models" / "demo-llama"),
        "HIVEMART_HOME": str(tmp_path / "seller-home"),
    }
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        ["bash", "-c", sell_command_text(body)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = Client(api_key=key, base_url=summary["web"])
    identity = tmp_path / "seller-home" / "provider.key"  # where the agent keeps its key by default
    try:
        deadline = time.monotonic() + 180
        while _state(client, identity) != "online":
            assert agent.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"not online; agent log:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        # Watch it across 2.5 heartbeat timeouts, while the scheduler's sweep (every 2 s in
        # the demo) marks silent providers offline: it must be online at every look.
        states = []
        watch_until = time.monotonic() + 2.5 * timeout
        while time.monotonic() < watch_until:
            states.append(_state(client, identity))
            time.sleep(period / 2)
        assert set(states) == {"online"}, states
        assert agent.poll() is None
    finally:
        client.close()
        os.killpg(agent.pid, signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
