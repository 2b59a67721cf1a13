"""Agents leave no processes behind, whether stopped cleanly or killed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopping_an_agent_leaves_no_process_behind(tiny_model: Path, tmp_path: Path, sig: int):
    swarm = start_swarm(tiny_model, [(0, 4)], tmp_path)
    try:
        agent = swarm.agents[0]
        children = [c.pid for c in psutil.Process(agent.process.pid).children(recursive=True)]
        assert children, "the agent should run its p2p daemon as a child process"
        assert any("p2pd" in psutil.Process(pid).name() for pid in children)
        swarm.stop_agent(agent, sig=sig)
        assert wait_gone([agent.process.pid, *children]) == []
        if sig == signal.SIGTERM:
            assert agent.process.returncode == 0, agent.log_tail()
    finally:
        swarm.stop()
