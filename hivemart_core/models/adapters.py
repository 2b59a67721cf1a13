"""LoRA adapters that fine-tuning jobs keep on a provider, and the layers that apply them.

Each job's adapter for a span lives in an :class:`AdapterStore` under a random id, owned by
the peer that created it: only that peer may use, update, read or delete it, and a request
without an adapter id computes the base model. The store has a byte budget (refusing with
``adapter_memory_full`` when spent) and forgets adapters unused for ``ttl`` seconds.

Target linear layers of every block are wrapped once, at load time, in
:class:`AdaptableLinear`. The adapter of the request being computed is passed through a
thread-local, not stored in the layers, because the server computes small requests on its
event-loop thread while large ones run on its compute thread: two requests with different
adapters may run at the same time and must not see each other's weights.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hivemart_core.models.lora import LoraSpec, module_path, split_block
from hivemart_core.protocol import error_codes as codes

__all__ = [
    "AdapterError",
    "Adapter",
    "AdapterStore",
    "AdaptableLinear",
    "ActiveLora",
    "install_adapter_slots",
    "active_lora",
]


class AdapterError(Exception):
    """An adapter request that cannot be served; ``code`` is sent back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ActiveLora:
    """The (A, B) pairs of the blocks of one request, looked up by the wrapped layers."""

    def __init__(
        self, spec: LoraSpec, shapes: Mapping[str, tuple[int, int]], weights: torch.Tensor, first_block: int
    ) -> None:
        self.scaling = spec.scaling
        self.first_block = first_block
        self.blocks = [split_block(spec, shapes, row) for row in weights]

    def pair(self, block: int, target: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        index = block - self.first_block
        if not 0 <= index < len(self.blocks):
            return None
        return self.blocks[index].get(target)


_local = threading.local()


@contextlib.contextmanager
def active_lora(lora: ActiveLora | None) -> Iterator[None]:
    """Apply ``lora`` to the wrapped layers run by this thread inside the block."""
    previous = getattr(_local, "lora", None)
    _local.lora = lora
    try:
        yield
    finally:
        _local.lora = previous


class AdaptableLinear(torch.nn.Module):
    """A linear layer plus the active adapter's ``scaling * B(A(x))``, as PEFT computes it."""

    def __init__(self, base: torch.nn.Linear, block: int, target: str) -> None:
        super().__init__()
        self.base, self.block, self.target = base, block, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        lora: ActiveLora | None = getattr(_local, "lora", None)
        if lora is None:
            return out
        pair = lora.pair(self.block, self.target)
        if pair is None:
            return out
        a, b = pair
        return out + F.linear(F.linear(x.to(a.dtype), a), b) * lora.scaling


def adaptable_copies(layers: list[torch.nn.Module], first_block: int, targets: list[str]) -> list[torch.nn.Module]:
    """Copies of ``layers`` that share every parameter and buffer with them (no weight is
    duplicated) and have their ``targets`` wrapped in :class:`AdaptableLinear`.

    Requests with an adapter run these; all others run the originals, so inference pays
    nothing for adapters (a wrapped layer costs an extra module call, 56 per token over 8
    blocks, which is a measurable share of a small span's step on a CPU).
    """
    copies = []
    for layer in layers:
        shared = {id(t): t for t in itertools.chain(layer.parameters(), layer.buffers())}
        copies.append(copy.deepcopy(layer, shared))
    install_adapter_slots(copies, first_block, targets)
    return copies


def install_adapter_slots(layers: list[torch.nn.Module], first_block: int, targets: list[str]) -> None:
    """Wrap the ``targets`` linear layers of every block of ``layers`` (block ``first_block`` first)."""
    for index, layer in enumerate(layers):
        for target in targets:
            parent_name, name = module_path(target).split(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, name)
            if isinstance(base, torch.nn.Linear):
                setattr(parent, name, AdaptableLinear(base, first_block + index, target))


@dataclass
class Adapter:
    """One job's adapter for blocks ``[start, end)`` (weights ``[end - start, per_block]``)."""

    adapter_id: str
    owner: str
    start: int
    end: int
    spec: LoraSpec
    weights: torch.Tensor
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.weights.numel() * self.weights.element_size()


class AdapterStore:
    """Adapters by id, within a byte budget, expiring after ``ttl`` seconds without use."""

    def __init__(self, *, budget_bytes: int, max_rank: int, ttl: float, max_adapters: int = 1024) -> None:
        self.budget_bytes, self.max_rank, self.ttl, self.max_adapters = budget_bytes, max_rank, ttl, max_adapters
        self._adapters: dict[str, Adapter] = {}

    @property
    def used_bytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)

    def check_new(self, adapter_id: str, spec: LoraSpec, nbytes: int) -> None:
        """Refuse an adapter that exists, is too large, or does not fit the budget."""
        if adapter_id in self._adapters:
            raise AdapterError(codes.ADAPTER_EXISTS, f"adapter {adapter_id} already exists here; choose another id")
        if spec.rank > self.max_rank:
            raise AdapterError(codes.TOO_LARGE, f"rank {spec.rank} exceeds this provider's limit of {self.max_rank}")
        if len(self._adapters) >= self.max_adapters:
            raise AdapterError(codes.ADAPTER_MEMORY_FULL, f"this provider already holds {len(self._adapters)} adapters")
        free = self.budget_bytes - self.used_bytes
        if nbytes > free:
            raise AdapterError(
                codes.ADAPTER_MEMORY_FULL,
                f"the adapter needs {nbytes} bytes, {max(free, 0)} of this "
                f"provider's adapter memory are free; use a smaller rank, "
                f"fewer targets, or another provider",
            )

    def add(self, adapter: Adapter) -> None:
        self.check_new(adapter.adapter_id, adapter.spec, adapter.nbytes)
        self._adapters[adapter.adapter_id] = adapter

    def get(self, adapter_id: str, owner: str) -> Adapter:
        """The adapter, refreshed; the same error whether it is missing or someone else's, so
        that other peers cannot learn which adapters exist."""
        adapter = self._adapters.get(adapter_id)
        if adapter is None or adapter.owner != owner:
            raise AdapterError(
                codes.UNKNOWN_ADAPTER,
                f"no adapter {adapter_id} of yours here (it may have expired "
                f"after {self.ttl:.0f} s unused); create it again",
            )
        adapter.last_used = time.monotonic()
        return adapter

    def delete(self, adapter_id: str, owner: str) -> None:
        self.get(adapter_id, owner)
        del self._adapters[adapter_id]

    def expire(self, now: float | None = None) -> list[str]:
        """Forget adapters unused for ``ttl`` seconds; returns their ids."""
        deadline = (time.monotonic() if now is None else now) - self.ttl
        expired = [i for i, a in self._adapters.items() if a.last_used < deadline]
        for adapter_id in expired:
            del self._adapters[adapter_id]
        return expired

    def clear(self) -> None:
        self._adapters.clear()
