"""Saving a swarm-trained LoRA adapter in PEFT's format (and reading any PEFT LoRA back).

``save_peft_adapter`` writes ``adapter_config.json`` (through ``peft.LoraConfig``) and
``adapter_model.safetensors`` with PEFT's key names, so that
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)``
computes what the distributed model computes with the adapter.

``read_peft_adapter`` reads such a directory (ours, or one PEFT saved for the model) into a
:class:`LoraSpec` and master weights, refusing what providers cannot compute exactly as
PEFT does (DoRA, per-layer ranks, LoRA on layers outside the blocks...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hivemart_core.errors import ModelError
from hivemart_core.models.lora import TARGET_MODULES, LoraSpec, module_path, split_block

__all__ = ["AdapterFormatError", "peft_state_dict", "save_peft_adapter", "load_peft_weights", "read_peft_adapter"]

_PREFIX = "base_model.model.model.layers"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight")
# PEFT options that change what a LoRA computes beyond ``scaling * B(A(x))`` on whole blocks.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}


class AdapterFormatError(ModelError):
    """A directory that is not a PEFT LoRA adapter the providers can apply to this model."""


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


def read_peft_adapter(
    path: str | Path, shapes: Mapping[str, tuple[int, int]], num_blocks: int
) -> tuple[LoraSpec, torch.Tensor]:
    """The spec and master weights ``[num_blocks, per_block]`` (float32) of the PEFT LoRA
    adapter in directory ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``
    with PEFT's key names) for a model of ``num_blocks`` blocks whose target layers have
    ``shapes``. Targets come from the saved weights; blocks the adapter leaves out
    (``layers_to_transform``) get zeros, which add nothing, as PEFT adds nothing there."""
    directory = Path(path)
    config = _read_config(directory)
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFormatError(f"{directory}/adapter_config.json: 'r' must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFormatError(f"{directory}/adapter_config.json: 'lora_alpha' must be a positive number")
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); LoraSpec scales by alpha / r
    state = _read_weights(directory)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        if match is None or TARGET_MODULES.get(match[3]) != match[2]:
            raise AdapterFormatError(
                f"{directory}: weight {key} is not a LoRA of a decoder block's linear layer "
                f"({', '.join(TARGET_MODULES)}); only those run on the providers"
            )
        block = int(match[1])
        if block >= num_blocks:
            raise AdapterFormatError(f"{directory}: {key} is for block {block}; the model has {num_blocks} blocks")
        pairs.setdefault((block, match[3]), {})[match[4]] = tensor
    if not pairs:
        raise AdapterFormatError(f"{directory}/adapter_model.safetensors holds no LoRA weights")
    targets = tuple(t for t in TARGET_MODULES if any(target == t for _, target in pairs))
    spec = LoraSpec(rank, float(alpha), targets)
    rows = [_block_row(directory, spec, shapes, block, pairs) for block in range(num_blocks)]
    return spec, torch.stack(rows)


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / "adapter_config.json"
    if not file.is_file():
        raise AdapterFormatError(
            f"{directory} is not a PEFT adapter directory (no adapter_config.json); pass the "
            f"directory `hivemart finetune --out` wrote or one saved by PEFT's save_pretrained"
        )
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{file}: a {config.get('peft_type')} adapter; only LoRA adapters run on providers")
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterFormatError(f"{file}: {what} is not supported by the providers")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{file}: bias={config['bias']!r} is not supported; train with bias='none'")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = directory / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterFormatError(f"{directory} has no adapter_model.safetensors (PEFT's weights file)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"{file} cannot be read: {e}") from None


def _block_row(
    directory: Path,
    spec: LoraSpec,
    shapes: Mapping[str, tuple[int, int]],
    block: int,
    pairs: Mapping[tuple[int, str], Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """One block's flat weights in :mod:`hivemart_core.models.lora`'s layout."""
    parts = []
    for target in spec.targets:
        fan_in, fan_out = shapes[target]
        pair = pairs.get((block, target))
        if pair is None:  # PEFT leaves this layer as it is: a zero adapter adds exactly nothing
            parts += [torch.zeros(spec.rank * fan_in), torch.zeros(fan_out * spec.rank)]
            continue
        for matrix, shape in (("A", (spec.rank, fan_in)), ("B", (fan_out, spec.rank))):
            tensor = pair.get(matrix)
            if tensor is None:
                raise AdapterFormatError(f"{directory}: block {block} {target} has no lora_{matrix} weight")
            if tuple(tensor.shape) != shape:
                raise AdapterFormatError(
                    f"{directory}: block {block} {target}.lora_{matrix} has shape {list(tensor.shape)}, expected "
                    f"{list(shape)} (rank {spec.rank}); is the adapter for another model?"
                )
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise AdapterFormatError(f"{directory}: block {block} {target}.lora_{matrix} has non-finite values")
            parts.append(tensor.float().flatten())
    return torch.cat(parts)
