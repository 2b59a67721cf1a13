"""Saving a swarm-trained LoRA adapter in PEFT's format (and reading it back).

``save_peft_adapter`` writes ``adapter_config.json`` (through ``peft.LoraConfig``) and
``adapter_model.safetensors`` with PEFT's key names, so that
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)``
computes what the distributed model computes with the adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hivemart_core.models.lora import LoraSpec, module_path, split_block

__all__ = ["peft_state_dict", "save_peft_adapter", "load_peft_weights"]

_PREFIX = "base_model.model.model.layers"


def _key(block: int, target: str, matrix: str) -> str:
    return f"{_PREFIX}.{block}.{module_path(target)}.lora_{matrix}.weight"


def peft_state_dict(
    spec: LoraSpec, shapes: dict[str, tuple[int, int]], weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PEFT's state dict (without the adapter name) of master weights ``[num_blocks, per_block]``."""
    state = {}
    for block, row in enumerate(weights.detach().float().cpu()):
        for target, (a, b) in split_block(spec, shapes, row).items():
            state[_key(block, target, "A")] = a.clone()
            state[_key(block, target, "B")] = b.clone()
    return state


def save_peft_adapter(
    spec: LoraSpec,
    shapes: dict[str, tuple[int, int]],
    weights: torch.Tensor,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
) -> Path:
    """Write the adapter to ``out_dir`` in PEFT's format; returns ``out_dir``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int but scales by alpha / r, any number
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=None if base_model is None else str(base_model),
    )
    config.save_pretrained(str(out))
    save_file(peft_state_dict(spec, shapes, weights), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def load_peft_weights(
    spec: LoraSpec, shapes: dict[str, tuple[int, int]], num_blocks: int, path: str | Path
) -> torch.Tensor:
    """Master weights ``[num_blocks, per_block]`` from a PEFT adapter directory written by
    :func:`save_peft_adapter` (or by PEFT for the same rank and targets)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    rows = []
    for block in range(num_blocks):
        parts = []
        for target in spec.targets:
            for matrix in ("A", "B"):
                key = _key(block, target, matrix)
                if key not in state:
                    raise ValueError(f"{path} lacks {key}")
                parts.append(state[key].float().flatten())
        rows.append(torch.cat(parts))
    weights = torch.stack(rows)
    expected = sum(spec.rank * (shapes[t][0] + shapes[t][1]) for t in spec.targets)
    if weights.shape[1] != expected:
        raise ValueError(f"{path} holds {weights.shape[1]} values per block, expected {expected}")
    return weights
