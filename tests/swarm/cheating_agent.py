"""TEST ONLY: a provider agent that returns perturbed activations.

``python -m tests.swarm.cheating_agent run ...`` takes the real agent's arguments and runs the
real agent, except that its backend adds Gaussian noise of ``HIVEMART_CHEAT_NOISE`` (default
1%) of each output's largest magnitude to everything it computes (inference steps and
forwards), the way a provider skimping on precision or faking work would. Its receipts are
honest about what it sent, so only shadow verification can catch it. Never import this from
product code.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from client_sdk.swarm.local import LocalSwarm
from hivemart_core.swarm.p2p import die_with_parent

NOISE_ENV = "HIVEMART_CHEAT_NOISE"


def perturb(output: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    scale = noise * float(output.detach().abs().max())
    return output + scale * torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)


def install(noise: float, seed: int = 0) -> None:
    """Make every SpanBackend of this process perturb its outputs."""
    from hivemart_core.models.backend import SpanBackend

    generator = torch.Generator().manual_seed(seed)
    honest_step, honest_steps = SpanBackend.inference_step, SpanBackend.inference_steps
    honest_forward = SpanBackend.forward

    def inference_step(self: SpanBackend, *args: Any, **kwargs: Any) -> torch.Tensor:
        return perturb(honest_step(self, *args, **kwargs), noise, generator)

    def inference_steps(self: SpanBackend, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        if len(args[0]) == 1:  # one step alone goes through inference_step (perturbed there)
            return honest_steps(self, *args, **kwargs)
        return [perturb(output, noise, generator) for output in honest_steps(self, *args, **kwargs)]

    def forward(self: SpanBackend, *args: Any, **kwargs: Any) -> torch.Tensor:
        return perturb(honest_forward(self, *args, **kwargs), noise, generator)

    SpanBackend.inference_step, SpanBackend.inference_steps = inference_step, inference_steps
    SpanBackend.forward = forward


class CheatingSwarm(LocalSwarm):
    """A LocalSwarm whose agents named in ``cheaters`` (set before they start) run this module
    instead of the real agent."""

    cheaters: set[str]

    def _launch(self, name: str, args: Sequence[str]) -> tuple[subprocess.Popen, Path, Path]:
        if name not in getattr(self, "cheaters", set()):
            return super()._launch(name, args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file, log_path = self.workdir / f"{name}.ready", self.workdir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "tests.swarm.cheating_agent", *args, "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=Path(__file__).resolve().parents[2],
            )
        return process, ready_file, log_path


if __name__ == "__main__":
    install(float(os.environ.get(NOISE_ENV, "0.01")))
    from provider_agent.cli import main

    main()
