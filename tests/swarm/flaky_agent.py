"""TEST ONLY: a provider agent whose backward replies break mid-stream now and then.

``python -m tests.swarm.flaky_agent run ...`` runs the real agent, except that the backward
replies numbered in ``HIVEMART_FLAKY_BREAKS`` (comma-separated, counted from 1) are cut short
and their streams closed, the way p2p daemons dropped the tail of replies under load (issue
14): the client reads part of a tensor and then the end of the stream. The provider itself
stays healthy. Never import this from product code.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.swarm.p2p import die_with_parent

BREAKS_ENV = "HIVEMART_FLAKY_BREAKS"


def install(breaks: set[int]) -> None:
    """Make this process's provider server cut the backward replies numbered in ``breaks``."""
    import provider_agent.server.span_rpcs as server  # the part that writes forward and backward replies
    from hivemart_core.protocol.framing import encode_message

    honest = server.write_message
    count = 0

    async def write_message(writer: Any, header: dict[str, Any], tensors: Sequence[Any] = ()) -> None:
        nonlocal count
        if header.get("type") == "grad":
            count += 1
            if count in breaks:
                data = b"".join(bytes(frame) for frame in encode_message(header, tensors))
                writer.write(data[: len(data) - 512])
                await writer.drain()
                raise ConnectionResetError(f"flaky agent: backward reply {count} cut short")
        await honest(writer, header, tensors)

    server.write_message = write_message


class FlakySwarm(LocalSwarm):
    """A LocalSwarm that can start flaky agents next to real ones."""

    def _launch(self, name: str, args: Sequence[str]) -> tuple[subprocess.Popen, Path, Path]:
        breaks = getattr(self, "flaky", {}).get(name)
        if breaks is None:
            return super()._launch(name, args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file, log_path = self.workdir / f"{name}.ready", self.workdir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "tests.swarm.flaky_agent", *args, "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=Path(__file__).resolve().parents[2],
                env={**os.environ, BREAKS_ENV: ",".join(map(str, sorted(breaks)))},
            )
        return process, ready_file, log_path

    def start_flaky(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        name: str,
        breaks: set[int],
        extra_args: Sequence[str] = (),
    ) -> AgentProcess:
        self.flaky = {**getattr(self, "flaky", {}), name: breaks}
        return self.start_agent(model_path, start, end, name=name, extra_args=extra_args)


if __name__ == "__main__":
    install({int(n) for n in os.environ.get(BREAKS_ENV, "").split(",") if n})
    from provider_agent.cli import main

    main()
