"""Two agents on one machine never share an identity: the second one on the default key refuses
to start with a one-line error saying to pass --identity; one given its own key starts."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.errors import SwarmError
from provider_agent.cli import cli
from provider_agent.identity_lock import IdentityInUseError, hold_identity

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def launch_default(swarm: LocalSwarm, model: Path, name: str, *extra: str) -> tuple[AgentProcess, Path]:
    """An agent launched the way a user would on the second try: no --identity (unless in ``extra``).
    It joins ``swarm.agents`` at once, so the swarm stops it whether or not it became ready."""
    args = [
        "run",
        "--model",
        str(model),
        "--blocks",
        "0:4",
        "--torch-threads",
        "1",
        *[a for peer in swarm.initial_peers for a in ("--initial-peers", peer)],
        *extra,
    ]
    process, ready_file, log_path = swarm._launch(name, args)
    agent = AgentProcess(process, {}, log_path, name)
    swarm.agents.append(agent)
    return agent, ready_file


def ready(swarm: LocalSwarm, launched: tuple[AgentProcess, Path]) -> AgentProcess:
    """Wait until a launched agent is ready; :class:`SwarmError` if it exits first."""
    agent, ready_file = launched
    agent.ready = swarm._wait_ready(agent.name, agent.process, ready_file, agent.log_path).ready
    return agent


def start_default(swarm: LocalSwarm, model: Path, name: str, *extra: str) -> AgentProcess:
    return ready(swarm, launch_default(swarm, model, name, *extra))


def test_a_second_agent_on_the_default_identity_refuses_to_start(tiny_model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HIVEMART_HOME", str(home))  # inherited by the agents LocalSwarm starts
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        first = start_default(swarm, tiny_model, "first")
        # The second (default key) and the third (a key of its own) start side by side: start-up is
        # most of this test's time.
        second = launch_default(swarm, tiny_model, "second")
        third = launch_default(swarm, tiny_model, "third", "--identity", str(tmp_path / "third.key"))
        with pytest.raises(SwarmError) as refused:
            ready(swarm, second)
        log = (tmp_path / "swarm" / "second.log").read_text()
        assert "Traceback" not in log
        error = [line for line in log.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and "in use by another running agent" in error[0] and "--identity" in error[0]
        assert str(home / "provider.key") in error[0] and "exited with code 1" in str(refused.value)

        # With its own key file, a second agent starts beside the first, under another peer id.
        other = ready(swarm, third)
        assert other.peer_id != first.peer_id

        # The lock dies with its holder, even a SIGKILLed one: the default identity is free again.
        swarm.stop_agent(first, sig=signal.SIGKILL)
        again = start_default(swarm, tiny_model, "fourth")
        assert again.peer_id == first.peer_id


def test_the_bootstrap_node_locks_its_identity_too(tmp_path):
    key = tmp_path / "dht.key"
    with hold_identity(key):  # as a running node would
        result = CliRunner().invoke(cli, ["dht", "--identity", str(key)])
    assert result.exit_code == 1
    assert "in use by another running agent" in result.output and "Traceback" not in result.output


def test_the_lock_is_released_when_its_holder_closes_it(tmp_path):
    key = tmp_path / "provider.key"
    lock = hold_identity(key)
    with pytest.raises(IdentityInUseError, match="--identity"):
        hold_identity(key)
    lock.close()
    hold_identity(key).close()
