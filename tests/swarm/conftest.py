"""Fixtures that start real provider agents (subprocesses with their p2p daemons) on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import pytest

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.swarm.runtime import SwarmRuntime


def start_swarm(
    model: Path, spans: list[tuple[int, int]], workdir: Path, *, extra_args: Sequence[str] = ()
) -> LocalSwarm:
    """A bootstrap node and one agent per span (with ``extra_args``); all stopped if one fails."""
    swarm = LocalSwarm(workdir=workdir)
    try:
        swarm.start_bootstrap()
        swarm.start_agents(model, spans, extra_args=extra_args)
    except BaseException:
        swarm.stop()
        raise
    return swarm


class Agent(NamedTuple):
    """One agent for :func:`start_agents_each`: what it serves and the arguments of its own."""

    name: str
    model: Path
    start: int
    end: int
    extra_args: Sequence[str] = ()
    torch_threads: int = 1


def start_agents_each(swarm: LocalSwarm, agents: Sequence[Agent]) -> list[AgentProcess]:
    """Start ``agents`` side by side, each with a model and arguments of its own
    (``LocalSwarm.start_agents`` gives all the same ones): all are launched, then waited for, since
    start-up is most of a swarm test's time. Launched from this thread, which their parent-death
    signal follows; all are killed if one fails."""
    launched = []
    try:
        for agent in agents:
            args = [
                "run",
                "--model",
                str(agent.model),
                "--blocks",
                f"{agent.start}:{agent.end}",
                "--identity",
                str(swarm.workdir / f"{agent.name}.key"),
                "--torch-threads",
                str(agent.torch_threads),
                *[a for peer in swarm.initial_peers for a in ("--initial-peers", peer)],
                *agent.extra_args,
            ]
            launched.append((agent.name, *swarm._launch(agent.name, args)))
        ready = [swarm._wait_ready(*entry) for entry in launched]
    except BaseException:
        for _, process, _, _ in launched:
            if process.poll() is None:
                process.kill()
                process.wait()
        raise
    swarm.agents.extend(ready)
    return ready


# ``two_provider_swarm`` (tests/conftest.py) is shared by the whole session; each module gets its own
# client runtime (its own peer id) into it.
@pytest.fixture(scope="module")
def runtime2(two_provider_swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(two_provider_swarm.initial_peers) as runtime:
        yield runtime


T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy (a deadline on an event, not a timing check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
