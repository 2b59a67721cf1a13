"""How the agent's OpenMP worker threads wait between parallel regions.

libgomp's workers busy-wait (about 300,000 spins, on the order of a millisecond) after
each parallel region before they sleep. That suits one process owning the machine, but an
agent rarely does: on a CPU host it shares cores with the client and the other hops of the
same chain, which run exactly when this agent has just finished its step, so its spinning
workers steal the cores the next hop needs. A short spin keeps most of the benefit inside
a step (the gaps between one layer's kernels are shorter than the spin) while handing the
cores back almost as soon as the step ends. Measured on a 2-core machine, hidden 512,
8 layers, 2 agents with 2 threads each: 14.9 ms per token with the default, 8.9 with
10,000 spins, 12.9 with 1,000 (workers fall asleep between kernels).

libgomp reads its settings once, when it is loaded (with torch), so this must run first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["AGENT_SPIN_COUNT", "PARALLEL_MIN_BLOCK_BYTES", "auto_threads", "limit_openmp_spinning", "usable_cores"]

AGENT_SPIN_COUNT = 10_000


def limit_openmp_spinning(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process unless the operator chose a waiting policy
    (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) or torch is already loaded (too late to
    matter). Returns whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(AGENT_SPIN_COUNT)
    return True


# Splitting a kernel across threads costs a wake-up and a barrier (tens of microseconds
# with several processes on the cores); one token's matrix-vector products only repay that
# when a block holds a few MiB of weights. Measured on a 2-core machine, 4 agents of a
# hidden-128 model (0.8 MiB a block): 5.0 ms per token with 1 thread each, 7.5 with 2;
# 2 agents of a hidden-512 model (12.5 MiB a block): 8.4 ms with 2 threads, 12.5 with 1.
PARALLEL_MIN_BLOCK_BYTES = 4 * 1024 * 1024


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(block_bytes: int, cores: int | None = None) -> int:
    """torch threads for CPU blocks of ``block_bytes`` of weights each: one per
    ``PARALLEL_MIN_BLOCK_BYTES``, at least 1 and at most one per usable core."""
    if block_bytes < 0:
        raise ValueError(f"block_bytes must be >= 0, got {block_bytes}")
    return max(1, min(usable_cores() if cores is None else cores, block_bytes // PARALLEL_MIN_BLOCK_BYTES))
