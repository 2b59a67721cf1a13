"""TEST ONLY: a provider agent that announces itself honestly-signed but never serves a session.

``python -m tests.swarm.hostile_agent run ...`` takes the real agent's arguments and runs the
real agent (real record, real p2p daemon), except that every inference ``open`` it gets is
answered according to ``HIVEMART_HOSTILE`` (read from its environment):

- ``bad_request``: an immediate ``bad_request`` error, whatever the client sent;
- ``silent``: nothing at all; the stream is held open and never answered;
- ``malformed``: an ``opened`` reply whose session id is a number (a malformed reply: the
  client must see a ProtocolError, not a KeyError or ValueError).

Started with ``--throughput 1e12`` over every block, its validly self-signed record is the
best route on paper, which is how one peer could capture a swarm's routing. Never import
this from product code.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.swarm.p2p import die_with_parent

MODE_ENV = "HIVEMART_HOSTILE"
MODES = ("bad_request", "silent", "malformed")


def install(mode: str) -> None:
    """Make every ProviderServer of this process answer inference opens as ``mode`` says."""
    from hivemart_core.protocol.framing import read_message, write_message
    from hivemart_core.protocol.rpc import error_header
    from provider_agent.server import ProviderServer

    if mode not in MODES:
        raise SystemExit(f"{MODE_ENV} must be one of {', '.join(MODES)}, not {mode!r}")

    async def handle_inference(
        self: ProviderServer, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_message(reader, self._limits)
        if mode == "bad_request":
            await write_message(writer, error_header("bad_request", "no"))
            return
        if mode == "malformed":
            await write_message(writer, {"type": "opened", "session_id": 12345678, "cache_tokens_left": 1})
            return
        await asyncio.Event().wait()  # silent: hold the stream open, answer nothing, ever

    ProviderServer._handle_inference = handle_inference


class HostileSwarm(LocalSwarm):
    """A LocalSwarm whose agents named in ``hostile`` run this module instead of the real agent
    (in the mode of ``HIVEMART_HOSTILE`` in this process's environment when they start)."""

    hostile: set[str]

    def _launch(self, name: str, args: Sequence[str]) -> tuple[subprocess.Popen, Path, Path]:
        if name not in getattr(self, "hostile", set()):
            return super()._launch(name, args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file, log_path = self.workdir / f"{name}.ready", self.workdir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "tests.swarm.hostile_agent", *args, "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=Path(__file__).resolve().parents[2],
            )
        return process, ready_file, log_path

    def start_hostile(
        self, model_path: str | Path, start: int, end: int, *, name: str, extra_args: Sequence[str] = ()
    ) -> AgentProcess:
        self.hostile = getattr(self, "hostile", set()) | {name}
        return self.start_agent(model_path, start, end, name=name, extra_args=extra_args)


if __name__ == "__main__":
    install(os.environ.get(MODE_ENV, "bad_request"))
    from provider_agent.cli import main

    main()
