"""Fixtures that start real provider agents (subprocesses with their p2p daemons) on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from client_sdk.swarm.local import LocalSwarm
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
