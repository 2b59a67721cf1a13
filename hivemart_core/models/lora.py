"""LoRA adapters for spans of blocks: the layout both clients and providers agree on.

An adapter adds ``scaling * B(A(x))`` (``scaling = alpha / rank``) to the output of each
*target* linear layer of every block of a span, exactly as PEFT's ``lora.Linear`` does
(no dropout, no bias). Weights travel as one flat tensor per span, in a fixed order:
for each block, for each target in the order given, ``A`` ``[rank, in]`` then ``B``
``[out, rank]``, row-major. Every block therefore holds the same number of parameters, and
the client keeps the master weights as one ``[num_blocks, per_block]`` tensor whose rows
``start:end`` are a span's flat weights.

Initialisation from a seed is PEFT's (``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B``
zero), drawn from a CPU ``torch.Generator`` seeded with ``seed`` for each block
separately, so a provider and its client compute bit-identical weights for any span.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "TARGET_MODULES",
    "LoraSpec",
    "target_shapes",
    "module_path",
    "block_numel",
    "init_block",
    "init_weights",
    "split_block",
]

# Linear layers of a Llama-family decoder block that an adapter may target, with their parent.
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target layers of an adapter (the same for every block)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must be a non-empty list of distinct module names")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; choose from {', '.join(TARGET_MODULES)}")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("alpha must be a positive finite number")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def module_path(target: str) -> str:
    """Path of a target inside a decoder block, e.g. ``self_attn.q_proj``."""
    return f"{TARGET_MODULES[target]}.{target}"


def target_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """``{target: (in_features, out_features)}`` of a Llama-family config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def block_numel(spec: LoraSpec, shapes: Mapping[str, tuple[int, int]]) -> int:
    """Parameters of one block's adapter."""
    return sum(spec.rank * (shapes[t][0] + shapes[t][1]) for t in spec.targets)


def init_block(spec: LoraSpec, shapes: Mapping[str, tuple[int, int]], seed: int, block: int) -> torch.Tensor:
    """Flat float32 weights of block ``block`` initialised from ``seed`` (PEFT's init)."""
    generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + block) % (2**63))
    parts = []
    for target in spec.targets:
        fan_in, fan_out = shapes[target]
        # PEFT's kaiming_uniform_(a=sqrt(5)) on [rank, fan_in] draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        a = (torch.rand(spec.rank, fan_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        parts += [a.flatten(), torch.zeros(fan_out * spec.rank, dtype=torch.float32)]
    return torch.cat(parts)


def init_weights(
    spec: LoraSpec, shapes: Mapping[str, tuple[int, int]], seed: int, start: int, end: int
) -> torch.Tensor:
    """Weights ``[end - start, per_block]`` of blocks ``[start, end)`` initialised from ``seed``."""
    return torch.stack([init_block(spec, shapes, seed, b) for b in range(start, end)])


def split_block(
    spec: LoraSpec, shapes: Mapping[str, tuple[int, int]], flat: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One block's flat weights -> ``{target: (A [rank, in], B [out, rank])}`` (views)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for target in spec.targets:
        fan_in, fan_out = shapes[target]
        a = flat[offset : offset + spec.rank * fan_in].view(spec.rank, fan_in)
        offset += spec.rank * fan_in
        b = flat[offset : offset + fan_out * spec.rank].view(fan_out, spec.rank)
        offset += fan_out * spec.rank
        out[target] = (a, b)
    if offset != flat.numel():
        raise ValueError(f"adapter weights of one block have {flat.numel()} values, expected {offset}")
    return out
