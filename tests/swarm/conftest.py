"""Fixtures that start real provider agents (subprocesses with their p2p daemons) on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from client_sdk.models import create_model
from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.runtime import SwarmRuntime

TINY = dict(arch="llama", hidden=64, layers=4, seed=0, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_model(tmp_path_factory.mktemp("models") / "tiny-llama", **TINY)


def start_swarm(model: Path, spans: list[tuple[int, int]], workdir: Path) -> LocalSwarm:
    swarm = LocalSwarm(workdir=workdir)
    try:
        swarm.start_bootstrap()
        swarm.start_agents(model, spans)
    except BaseException:
        swarm.stop()
        raise
    return swarm


@pytest.fixture(scope="module")
def two_provider_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tiny_model, [(0, 2), (2, 4)], tmp_path_factory.mktemp("swarm2"))
    yield swarm
    swarm.stop()


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
