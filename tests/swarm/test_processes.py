"""Agents leave no processes behind, whether stopped cleanly or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hivemart_core.swarm.p2p import die_with_parent
from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
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


def _start_in_own_group(args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    """``python -m provider_agent ARGS`` as the leader of a new process group (as a shell or
    systemd starts it), once it wrote its ready file."""
    ready = tmp_path / f"{name}.ready"
    log = open(tmp_path / f"{name}.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "provider_agent", "-v", *args, "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, f"{name} never became ready"
        time.sleep(0.1)
    return process


def _signal(process: subprocess.Popen, how: str) -> list[int]:
    """Send SIGTERM the way ``how`` says; the pids that must all be gone afterwards."""
    children = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    if how == "group":  # `timeout`, Ctrl-C, `kill -- -PGID`
        os.killpg(process.pid, signal.SIGTERM)
    elif how == "every-process":  # systemd's default KillMode=control-group: the daemon dies at once too
        for pid in [*children, process.pid]:
            os.kill(pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    return [process.pid, *children]


@pytest.mark.parametrize("how", ["group", "every-process", "pid"])
def test_sigterm_stops_the_bootstrap_node_and_an_agent_promptly(tiny_model: Path, tmp_path: Path, how: str):
    """SIGTERM however it is sent ends both processes with their p2p daemons, exit code 0.

    Before, a signal that reached the p2p daemon too left the process waiting on the dead
    daemon forever. The deadline is a hang detector, not a timing check (shutdown is bounded
    by a few 5 s steps).
    """
    dht = _start_in_own_group(["dht"], tmp_path, "dht")
    try:
        peers = json.loads((tmp_path / "dht.ready").read_text())["ready"]["maddrs"]
        agent = _start_in_own_group(
            [
                "run",
                "--model",
                str(tiny_model),
                "--blocks",
                "0:4",
                "--torch-threads",
                "1",
                "--identity",
                str(tmp_path / "agent.key"),
                "--initial-peers",
                peers[0],
            ],
            tmp_path,
            "agent",
        )
        try:
            for process, name in ((agent, "agent"), (dht, "dht")):
                pids = _signal(process, how)
                try:
                    assert process.wait(60) == 0, (tmp_path / f"{name}.log").read_text()
                except subprocess.TimeoutExpired:
                    pytest.fail(
                        f"{name} still runs 60 s after SIGTERM ({how}):\n"
                        + (tmp_path / f"{name}.log").read_text()[-3000:]
                    )
                assert wait_gone(pids) == []
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    finally:
        if dht.poll() is None:
            os.killpg(dht.pid, signal.SIGKILL)
            dht.wait()
