"""Start a swarm on this machine: a bootstrap DHT node and provider agents as subprocesses.

Used by ``hivemart demo``, the benchmarks and the tests. Every process started here gets
the kernel's parent-death signal, so none outlives the Python process that started it,
even when that one is SIGKILLed; :meth:`LocalSwarm.stop` stops them cleanly first.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from client_sdk.processes import log_tail, stop_processes
from hivemart_core.errors import SwarmError
from hivemart_core.swarm.p2p import die_with_parent

__all__ = ["LocalSwarm", "AgentProcess"]


class AgentSpec(NamedTuple):
    """One agent for :meth:`LocalSwarm.start_each`: its name, what it serves, its own arguments."""

    name: str
    model: Path
    start: int
    end: int
    extra_args: Sequence[str] = ()
    torch_threads: int = 1


@dataclass
class AgentProcess:
    """A running ``hivemart-provider`` subprocess and what it reported when ready."""

    process: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path
    name: str

    @property
    def peer_id(self) -> str:
        peer_id: str = self.ready["peer_id"]
        return peer_id

    @property
    def maddrs(self) -> list[str]:
        maddrs: list[str] = self.ready["maddrs"]
        return maddrs

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


@dataclass
class LocalSwarm:
    """``with LocalSwarm() as swarm: swarm.start_agent(model, 0, 4) ...``"""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hivemart-swarm-")))
    python: str = sys.executable
    startup_timeout: float = 120.0
    bootstrap: AgentProcess | None = None
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def initial_peers(self) -> list[str]:
        if self.bootstrap is None:
            raise SwarmError("the local swarm has no bootstrap node yet; call start_bootstrap()")
        return self.bootstrap.maddrs

    def _launch(self, name: str, args: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file = self.workdir / f"{name}.ready"
        log_path = self.workdir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "provider_agent", *args, "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        return process, ready_file, log_path

    def _wait_ready(
        self, name: str, process: subprocess.Popen[bytes], ready_file: Path, log_path: Path
    ) -> AgentProcess:
        deadline = time.monotonic() + self.startup_timeout
        while not ready_file.exists():
            if process.poll() is not None:
                agent = AgentProcess(process, {}, log_path, name)
                raise SwarmError(
                    f"{name} exited with code {process.returncode} before it was ready:\n{agent.log_tail()}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise SwarmError(f"{name} was not ready within {self.startup_timeout:.0f} s; see {log_path}")
            time.sleep(0.05)
        ready = json.loads(ready_file.read_text())["ready"]
        return AgentProcess(process, ready, log_path, name)

    def _spawn(self, name: str, args: Sequence[str]) -> AgentProcess:
        return self._wait_ready(name, *self._launch(name, args))

    def start_bootstrap(self) -> AgentProcess:
        self.bootstrap = self._spawn("dht", ["dht"])
        return self.bootstrap

    def start_agent(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        torch_threads: int = 1,
    ) -> AgentProcess:
        """Start an agent serving blocks ``[start, end)`` and wait until it announced itself."""
        return self.start_agents(
            model_path,
            [(start, end)],
            names=[name] if name else None,
            extra_args=extra_args,
            torch_threads=torch_threads,
        )[0]

    def start_placed_agent(
        self,
        model_path: str | Path,
        num_blocks: int,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        torch_threads: int = 1,
    ) -> AgentProcess:
        """Start an agent that serves ``num_blocks`` blocks wherever the swarm needs them most."""
        name = name or f"agent{len(self.agents)}-placed"
        args = [
            "run",
            "--model",
            str(model_path),
            "--num-blocks",
            str(num_blocks),
            "--identity",
            str(self.workdir / f"{name}.key"),
            "--torch-threads",
            str(torch_threads),
            *[a for peer in self.initial_peers for a in ("--initial-peers", peer)],
            *extra_args,
        ]
        agent = self._spawn(name, args)
        self.agents.append(agent)
        return agent

    def start_agents(
        self,
        model_path: str | Path,
        spans: Sequence[tuple[int, int]],
        *,
        names: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        torch_threads: int = 1,
    ) -> list[AgentProcess]:
        """Start one agent per span at once (start-up is mostly imports and loading) and wait
        until all of them announced themselves."""
        return self.start_each(
            [
                AgentSpec(
                    names[i] if names else f"agent{len(self.agents) + i}-{start}-{end}",
                    Path(model_path),
                    start,
                    end,
                    extra_args,
                    torch_threads,
                )
                for i, (start, end) in enumerate(spans)
            ]
        )

    def start_each(self, specs: Sequence[AgentSpec]) -> list[AgentProcess]:
        """Start agents side by side, each with a model and arguments of its own: all are
        launched, then waited for; all are killed if one fails to start."""
        launched = []
        try:
            for spec in specs:
                args = [
                    "run",
                    "--model",
                    str(spec.model),
                    "--blocks",
                    f"{spec.start}:{spec.end}",
                    "--identity",
                    str(self.workdir / f"{spec.name}.key"),
                    "--torch-threads",
                    str(spec.torch_threads),
                    *[a for peer in self.initial_peers for a in ("--initial-peers", peer)],
                    *spec.extra_args,
                ]
                launched.append((spec.name, *self._launch(spec.name, args)))
            agents = [self._wait_ready(*entry) for entry in launched]
        except BaseException:
            for _, process, _, _ in launched:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            raise
        self.agents.extend(agents)
        return agents

    def stop_agent(self, agent: AgentProcess, *, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop one agent with ``sig`` (SIGKILL to simulate a crash); returns its exit code."""
        if agent.process.poll() is None:
            agent.process.send_signal(sig)
            try:
                agent.process.wait(timeout)
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
        return agent.process.returncode

    def stop(self) -> None:
        """Stop every process this swarm started (agents first, then the bootstrap node)."""
        processes = [a.process for a in self.agents]
        if self.bootstrap is not None:
            processes.append(self.bootstrap.process)
        stop_processes(processes)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
