"""Probing a provider through the swarm: is it fast, and is it right?

No Django here. A probe asks the provider for its ``info``, then sends forwards of random
hidden states through its span and compares every answer with a reference computed
locally from the same checkpoint (``hivemart_core.models.backend.SpanBackend``):

- one forward of 1 token through its first block: the *latency* (a hop plus one block);
- ``requests`` forwards of ``tokens`` tokens through its whole span: the *throughput*, in
  work units per second (tokens x blocks / seconds, the median over the answered requests).

The *success rate* is the share of those forwards answered correctly: in time, with the
right shape, and within ``tolerance`` (relative L2 error) of the reference. A provider
that does not answer, serves another model than it registered, or whose outputs differ
from the reference scores accordingly; the scheduler marks it degraded. Answers that
arrive but differ from the reference (``ProbeResult.mismatches``) are wrong results, not
slowness: the scheduler records each probe with any as an offence (reputation, suspension).

References are loaded once per model and kept (:class:`References`); for a large model
the prober needs the memory for all its blocks on CPU, or a validator with a GPU.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hivemind.utils.logging import get_logger

from hivemart_core.errors import HivemartError, ProtocolError
from hivemart_core.protocol.rpc import RPC_FORWARD, SpanRequest
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["ProbeTarget", "ProbeResult", "References", "ReferenceUnavailable", "probe_provider", "TOLERANCE"]

logger = get_logger(__name__)

# Relative L2 error accepted per dtype: float32 differs only by summation order across
# machines and thread counts; half precision loses ~3 decimal digits per block.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
_PROBE_SESSION = "scheduler-probe"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ReferenceUnavailable(Exception):
    """The prober has no (or the wrong) checkpoint for a model: its problem, not the provider's."""


@dataclass(frozen=True)
class ProbeTarget:
    """Who to probe and what it registered to serve."""

    peer_id: str
    model_id: str
    start: int
    end: int
    # A platform-signed ticket for the probe's forwards: providers that sell through the
    # marketplace serve nothing without one (``None`` for free-mode swarms).
    ticket: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProbeResult:
    peer_id: str
    requests: int  # forwards sent (or that would have been sent)
    correct: int  # answered in time and matching the reference
    throughput: float  # work units per second; 0 when nothing was answered
    latency_ms: float  # the 1-token, 1-block round trip; the timeout when unanswered
    errors: tuple[str, ...] = field(default=())  # what went wrong, for the logs
    # Answers that arrived but differ from the validator's recomputation: wrong results, which
    # (unlike silence or slowness) are an offence.
    mismatches: int = 0

    @property
    def success_rate(self) -> float:
        return self.correct / self.requests if self.requests else 0.0


class References:
    """Reference blocks per model (the platform validator), loaded on first use from
    ``<models_dir>/<model_id>/`` or else from the folder under ``models_dir`` whose checkpoint
    computes to that model id."""

    def __init__(self, models_dir: str | Path) -> None:
        self.models_dir = Path(models_dir)
        self._backends: dict[str, Any] = {}
        self._ids: dict[Path, str] = {}  # folder -> model id, for folders not named after their model

    def get(self, model_id: str) -> Any:
        """A ``SpanBackend`` over all blocks of ``model_id``; ReferenceUnavailable when the
        checkpoint is missing or is another model."""
        backend = self._backends.get(model_id)
        if backend is not None:
            return backend
        from hivemart_core.models import load_model_info
        from hivemart_core.models.backend import SpanBackend

        path = self.models_dir / model_id
        if not (path / "config.json").is_file():
            path = self._find(model_id)
        try:
            info = load_model_info(path)
        except HivemartError as e:
            raise ReferenceUnavailable(f"cannot read the checkpoint at {path}: {e}") from e
        if info.model_id != model_id:
            raise ReferenceUnavailable(f"the checkpoint at {path} is {info.model_id}, not {model_id}")
        backend = SpanBackend(path, 0, info.num_blocks, dtype=torch.float32)
        self._backends[model_id] = backend
        return backend

    def _find(self, model_id: str) -> Path:
        """The checkpoint under ``models_dir`` whose computed model id is ``model_id`` (for
        checkpoints kept under other folder names)."""
        from hivemart_core.models import load_model_info

        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if not (folder / "config.json").is_file():
                    continue
                known = self._ids.get(folder)
                if known is None:
                    try:
                        known = self._ids[folder] = load_model_info(folder).model_id
                    except HivemartError:
                        continue
                if known == model_id:
                    return folder
        raise ReferenceUnavailable(
            f"no checkpoint for {model_id} in {self.models_dir}; put it at "
            f"{self.models_dir / model_id} (HIVEMART_MODELS_DIR)"
        )


def _relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    output, expected = output.float(), expected.float()
    if output.shape != expected.shape or not torch.isfinite(output).all():
        return float("inf")
    return float(torch.linalg.vector_norm(output - expected) / (torch.linalg.vector_norm(expected) + 1e-12))


async def _forward(
    connection: ProviderConnection,
    start: int,
    end: int,
    hidden: torch.Tensor,
    timeout: float,
    ticket: dict[str, Any] | None,
) -> tuple[torch.Tensor, float]:
    began = time.perf_counter()
    if ticket is None:
        output = await asyncio.wait_for(connection.forward(start, end, hidden, timeout=timeout), timeout)
    else:
        header = SpanRequest(start, end, ticket=ticket, session_id=_PROBE_SESSION).to_header()
        reply = await asyncio.wait_for(connection.call(RPC_FORWARD, header, (hidden,), timeout), timeout)
        if len(reply.tensors) != 1:
            raise ProtocolError(f"provider {connection.peer_id} answered a probe with {len(reply.tensors)} tensors")
        output = reply.tensors[0]
    return output, time.perf_counter() - began


def probe_provider(
    runtime: SwarmRuntime,
    target: ProbeTarget,
    reference: Any,
    *,
    tokens: int = 16,
    requests: int = 2,
    timeout: float = 30.0,
    seed: int | None = None,
) -> ProbeResult:
    """Probe ``target`` over ``runtime``'s swarm against ``reference`` (a ``SpanBackend``
    over at least the target's span). Never raises for the provider's failures: they are
    what the result records."""
    total = requests + 1
    unanswered = ProbeResult(target.peer_id, total, 0, 0.0, timeout * 1000.0)
    connection = ProviderConnection(runtime.p2p, target.peer_id)
    try:
        info = runtime.run(connection.info_reply(timeout=timeout), timeout=timeout + 5)
    except (HivemartError, TimeoutError, OSError) as e:  # a malformed reply is a ProtocolError, a HivemartError
        return ProbeResult(**{**unanswered.__dict__, "errors": (f"info: {e}",)})
    if info.model_id != target.model_id or not (info.start <= target.start and target.end <= info.end):
        return ProbeResult(
            **{
                **unanswered.__dict__,
                "errors": (
                    f"serves {info.model_id!r} blocks {info.start}:{info.end}, registered "
                    f"{target.model_id} blocks {target.start}:{target.end}",
                ),
            }
        )
    dtype = _DTYPES.get(info.dtype)
    if dtype is None:
        return ProbeResult(**{**unanswered.__dict__, "errors": (f"unsupported dtype {info.dtype!r}",)})

    generator = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**63)
    hidden_size = reference.info.hidden_size
    # (start, end, hidden): the latency probe first, then the throughput probes.
    plan = [(target.start, target.start + 1, torch.randn(1, 1, hidden_size, generator=generator))]
    plan += [
        (target.start, target.end, torch.randn(1, tokens, hidden_size, generator=generator)) for _ in range(requests)
    ]
    correct, mismatches, rates, errors = 0, 0, [], []
    latency_ms = timeout * 1000.0
    for k, (start, end, hidden) in enumerate(plan):
        hidden = hidden.to(dtype)
        try:
            output, seconds = runtime.run(
                _forward(connection, start, end, hidden, timeout, target.ticket), timeout=timeout + 5
            )
        except (HivemartError, TimeoutError, OSError) as e:
            errors.append(f"forward {start}:{end}: {e}")
            continue
        # The reference runs here, not on the swarm loop, so it never stalls other traffic.
        expected = reference.forward(hidden.float(), start, end)
        error = _relative_error(output, expected)
        if error <= TOLERANCE[dtype]:
            correct += 1
        else:
            mismatches += 1
            errors.append(f"forward {start}:{end}: relative error {error:.3g} against the reference")
        if k == 0:
            latency_ms = seconds * 1000.0
        else:
            rates.append(hidden.shape[1] * (end - start) / max(seconds, 1e-9))
    throughput = statistics.median(rates) if rates else 0.0
    if errors:
        logger.info(f"probe of {target.peer_id}: {correct}/{total} correct; {'; '.join(errors)}")
    return ProbeResult(target.peer_id, total, correct, throughput, latency_ms, tuple(errors), mismatches)
