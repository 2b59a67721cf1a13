"""Shadow verification: re-run a random fraction of steps on a backup and compare.

With probability ``rate`` per step and hop, the client takes the hidden states that entered
the hop's first block for every position so far (it keeps them for failover anyway), runs
them through the same blocks on another provider that holds them (``rpc_forward`` of the
whole prefix, billed to that provider's ticket), and compares the last positions with what
the hop returned, within the tolerance of ``hivemart_core.protocol.verification``. A forward
of the prefix computes the same function as the KV-cached steps (causal attention over the
same positions), so an honest provider matches up to floating-point noise.

A provider that perturbs every output is caught at the first checked step: with rate ``r``
the chance that ``n`` steps pass unchecked is ``(1 - r) ** n``, so 95% of cheaters are caught
within ``3 / r`` steps. On a mismatch the session stops using the provider (closing its
session first, so that its final receipt covers the disputed output) and then :meth:`report`
hands the evidence (inputs, claimed and reference outputs) to ``on_mismatch``, which files an
audit. Who is right is decided by the audit, on a third party, not here.

A pushed chain is checked on every step, not by sampling: each provider signs a step record
of its input and output (``hivemart_core.protocol.commitments``), the next provider hands the
record of the push it received back to the client, and a provider whose pushed record
differs from the one it returned is caught with two of its own signatures as the evidence
(:class:`Equivocation`). The session checks that before it verifies anything, so a hop is
only ever verified on the inputs it actually received.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P
from hivemind.utils.logging import get_logger

from client_sdk.swarm.routing import RouteHop
from hivemart_core.errors import ProtocolError, ProviderUnavailableError, RemoteError
from hivemart_core.protocol.commitments import StepRecord
from hivemart_core.protocol.tickets import JobTicket
from hivemart_core.protocol.verification import OutputComparison, compare_outputs
from hivemart_core.swarm.connection import ProviderConnection, SpanBilling

__all__ = ["ShadowVerifier", "Mismatch", "Equivocation", "VerificationStats", "FindReferences"]

logger = get_logger(__name__)

# find_references(start, end, avoid) -> providers holding blocks [start, end), each with the
# billing of its ticket (None without a market), best first.
FindReferences = Callable[[int, int, frozenset[str]], Awaitable[list[tuple[RouteHop, SpanBilling | None]]]]


@dataclass(frozen=True)
class Mismatch:
    """Evidence that a provider's output differs from a reference computation."""

    peer_id: str
    ticket: JobTicket | None
    session_id: str
    start: int
    end: int
    inputs: torch.Tensor  # hidden states at block ``start``, every position so far
    claimed: torch.Tensor  # what the provider returned for the last positions
    reference: torch.Tensor  # what the reference provider returned for them
    reference_peer: str
    comparison: OutputComparison

    @property
    def dtype(self) -> str:
        return self.comparison.dtype


@dataclass(frozen=True)
class Equivocation:
    """Proof that provider ``peer_id`` pushed the next provider (``relayed_by``) an output other
    than the one it returned to the client for step ``step_id`` of its session: two records it
    signed for that step (``returned`` came with its output, ``pushed`` with the push) that
    differ. :func:`hivemart_core.protocol.commitments.equivocation` checks it with the peer id alone."""

    peer_id: str
    ticket: JobTicket | None
    session_id: str
    start: int
    end: int
    step_id: int
    returned: StepRecord
    pushed: StepRecord
    relayed_by: str

    def evidence(self) -> dict[str, object]:
        return {"kind": "equivocation", "records": [self.returned.to_dict(), self.pushed.to_dict()]}


@dataclass
class VerificationStats:
    """Counts for the job's summary."""

    checked: int = 0  # hop-steps compared with a reference
    mismatches: int = 0
    skipped: int = 0  # due, but no reference provider could run it
    caught: list[str] = field(default_factory=list)  # peer ids of providers that mismatched

    def to_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "mismatches": self.mismatches,
            "skipped": self.skipped,
            "caught": list(self.caught),
        }


class ShadowVerifier:
    """Decides which steps to check and checks them (see the module docstring)."""

    def __init__(
        self,
        *,
        rate: float,
        find_references: FindReferences,
        on_mismatch: Callable[[Mismatch], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        timeout: float = 60.0,
        max_prefix_tokens: int = 8192,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("verify rate must be in [0, 1]")
        self.rate, self.find_references, self.on_mismatch = rate, find_references, on_mismatch
        self.rng = rng or random.Random()
        self.timeout, self.max_prefix_tokens = timeout, max_prefix_tokens
        self.stats = VerificationStats()

    def due(self) -> bool:
        """Whether to check this hop's step (independently per hop and step)."""
        return self.rate > 0 and self.rng.random() < self.rate

    async def check(
        self,
        p2p: P2P,
        hop: RouteHop,
        ticket: JobTicket | None,
        session_id: str,
        prefix: torch.Tensor,
        claimed: torch.Tensor,
    ) -> Mismatch | None:
        """Recompute the hop's last ``claimed.shape[1]`` positions from ``prefix`` on another
        provider of its blocks; a :class:`Mismatch` when they differ (see :meth:`report`)."""
        if prefix.shape[0] * prefix.shape[1] > self.max_prefix_tokens:
            self.stats.skipped += 1
            logger.debug(f"not verifying blocks {hop.start}:{hop.end}: the prefix is too long")
            return None
        references = await self.find_references(hop.start, hop.end, frozenset({hop.peer_id}))
        for reference_hop, billing in references:
            dtype = getattr(torch, reference_hop.record.dtype)
            connection = ProviderConnection(p2p, reference_hop.peer_id, billing=billing)
            try:
                output = await connection.forward(hop.start, hop.end, prefix.to(dtype).contiguous(), self.timeout)
            except (ProviderUnavailableError, RemoteError, ProtocolError) as e:
                logger.info(
                    f"reference provider {reference_hop.peer_id} could not verify blocks {hop.start}:{hop.end}: {e}"
                )
                continue
            reference = output[:, -claimed.shape[1] :]
            comparison = compare_outputs(claimed, reference)
            self.stats.checked += 1
            if comparison.matches:
                return None
            return self._mismatch(
                hop, ticket, session_id, prefix, claimed, reference, reference_hop.peer_id, comparison
            )
        self.stats.skipped += 1
        return None

    def _mismatch(
        self,
        hop: RouteHop,
        ticket: JobTicket | None,
        session_id: str,
        prefix: torch.Tensor,
        claimed: torch.Tensor,
        reference: torch.Tensor,
        reference_peer: str,
        comparison: OutputComparison,
    ) -> Mismatch:
        self.stats.mismatches += 1
        self.stats.caught.append(hop.peer_id)
        logger.warning(
            f"provider {hop.peer_id} returned outputs for blocks {hop.start}:{hop.end} that differ from "
            f"{reference_peer}'s ({comparison}); reporting it and moving its blocks elsewhere"
        )
        return Mismatch(
            hop.peer_id, ticket, session_id, hop.start, hop.end, prefix, claimed, reference, reference_peer, comparison
        )

    async def report(self, mismatch: Mismatch) -> None:
        """Hand a mismatch to ``on_mismatch`` (the job files an audit)."""
        if self.on_mismatch is not None:
            await self.on_mismatch(mismatch)
