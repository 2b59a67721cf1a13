"""TEST ONLY: provider agents that try to get an honest neighbour blamed in a pushed chain.

``python -m tests.swarm.framing_agent run ...`` takes the real agent's arguments and runs the
real agent with one change, chosen by ``HIVEMART_ADVERSARY``:

- ``framer``: returns honest outputs to the client but pushes them to the next provider with
  Gaussian noise of 1% of their largest magnitude, and signs a step record for what it pushed
  (so the next provider accepts the push), as a provider framing its downstream would;
- ``framer-unsigned``: the same noise, pushed with the record of the honest output;
- ``liar``: computes honestly, but the record it returns for a pushed step claims another
  input than it received, backed by the pushed record as received (``keep``), altered
  (``forge``) or left out (``drop``); or (``position``) answers every step, pushed or not, at
  another position than it was sent at, in its reply and in the record it signs. The mode is
  read from the file ``HIVEMART_LIAR_MODE_FILE`` at every step, so one agent serves every mode.

Never import this from product code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from client_sdk.swarm.local import AgentProcess
from hivemart_core.swarm.p2p import die_with_parent
from tests.swarm.cheating_agent import CheatingSwarm, perturb

ADVERSARY_ENV = "HIVEMART_ADVERSARY"
LIAR_MODE_ENV = "HIVEMART_LIAR_MODE_FILE"


def install_framer(noise: float, *, signed: bool, seed: int = 0) -> None:
    """Make the agent push noisy outputs (see the module docstring)."""
    from provider_agent.server import ProviderServer

    generator = torch.Generator().manual_seed(seed)
    honest_push = ProviderServer._push

    async def push(self: ProviderServer, session: Any, step: Any, delivered: Any) -> None:
        if isinstance(delivered, torch.Tensor):  # a server without step records pushes the bare output
            return await honest_push(self, session, step, perturb(delivered, noise, generator))
        from hivemart_core.protocol.commitments import digest_hex, sign_step

        noisy = perturb(delivered.output, noise, generator)
        record = delivered.record
        if signed:
            record = sign_step(
                self.identity,
                session_id=record.session_id,
                instance=record.instance,
                step_id=record.step_id,
                position=record.position,
                input_digest=record.input_digest,
                output_digest=digest_hex(noisy),
                ticket_id=record.ticket_id,
            )
        await honest_push(self, session, step, dataclasses.replace(delivered, output=noisy, record=record))

    ProviderServer._push = push


def install_liar(mode_file: Path) -> None:
    """Make the agent misstate the input of every pushed step (see the module docstring)."""
    from hivemart_core.protocol.commitments import StepRecord, sign_step
    from provider_agent.server import ProviderServer

    honest_compute = ProviderServer._compute_step

    async def compute_step(
        self: ProviderServer, session: Any, step: Any, tensors: Any, input_record: Any, input_digest: Any
    ) -> Any:
        delivered = await honest_compute(self, session, step, tensors, input_record, input_digest)
        mode = mode_file.read_text().strip() if mode_file.exists() else "keep"
        if delivered is not None and mode == "position":
            return _shifted(self, session, delivered)
        if delivered is None or input_record is None:
            return delivered
        claimed = hashlib.sha256(b"not what I got" + bytes.fromhex(delivered.record.input_digest)).hexdigest()
        record = sign_step(
            self.identity,
            session_id=delivered.record.session_id,
            instance=delivered.record.instance,
            step_id=step.step_id,
            position=step.position,
            input_digest=claimed,
            output_digest=delivered.record.output_digest,
            ticket_id=delivered.record.ticket_id,
        )
        shown = {
            "keep": input_record,
            "drop": None,
            "forge": StepRecord(**{**input_record.to_dict(), "output_digest": claimed}),
        }[mode]
        delivered = dataclasses.replace(delivered, record=record, input_record=shown)
        session.last_output = delivered
        return delivered

    ProviderServer._compute_step = compute_step


def _shifted(server: Any, session: Any, delivered: Any) -> Any:
    """``delivered`` claimed one position later, consistently signed."""
    from hivemart_core.protocol.commitments import sign_step

    old = delivered.record
    record = sign_step(
        server.identity,
        session_id=old.session_id,
        instance=old.instance,
        step_id=old.step_id,
        position=old.position + 1,
        input_digest=old.input_digest,
        output_digest=old.output_digest,
        ticket_id=old.ticket_id,
    )
    delivered = dataclasses.replace(delivered, position=delivered.position + 1, record=record)
    session.last_output = delivered
    return delivered


class AdversarySwarm(CheatingSwarm):
    """A CheatingSwarm that can also start agents of this module (``start_adversary``)."""

    adversaries: dict[str, dict[str, str]]

    def _launch(self, name: str, args: Sequence[str]) -> tuple[subprocess.Popen, Path, Path]:
        env = getattr(self, "adversaries", {}).get(name)
        if env is None:
            return super()._launch(name, args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file, log_path = self.workdir / f"{name}.ready", self.workdir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "tests.swarm.framing_agent", *args, "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=Path(__file__).resolve().parents[2],
                env={**os.environ, **env},
            )
        return process, ready_file, log_path

    def start_adversary(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        name: str,
        adversary: str,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> AgentProcess:
        self.adversaries = {**getattr(self, "adversaries", {}), name: {ADVERSARY_ENV: adversary, **(env or {})}}
        return self.start_agent(model_path, start, end, name=name, extra_args=extra_args)


if __name__ == "__main__":
    kind = os.environ.get(ADVERSARY_ENV, "framer")
    if kind in ("framer", "framer-unsigned"):
        install_framer(0.01, signed=kind == "framer")
    elif kind == "liar":
        install_liar(Path(os.environ[LIAR_MODE_ENV]))
    else:
        raise SystemExit(f"unknown {ADVERSARY_ENV}: {kind}")
    from provider_agent.cli import main

    main()
