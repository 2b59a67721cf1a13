"""Reading Llama-family checkpoints tensor by tensor, and digests of their weights.

Only the tensors asked for are read (``safetensors.safe_open``), so a provider serving
four blocks of a 70-block model never touches the other 66. Digests are computed from the
bytes as stored, so two peers with the same checkpoint compute the same digests whatever
dtype or device they run in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from client_sdk.errors import ModelError

__all__ = [
    "SUPPORTED_ARCHS", "ModelInfo", "load_config", "load_model_info", "read_tensors", "block_prefix",
    "block_digest", "client_digest", "model_digest",
]

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2")
CLIENT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


def load_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config; ModelError when missing or of an unsupported architecture."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a checkpoint directory (no config.json); create one with "
                         f"`hivemart model create OUT`")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read the config of {path}: {e}") from e
    if config.model_type not in SUPPORTED_ARCHS:
        raise ModelError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(SUPPORTED_ARCHS)}")
    config._attn_implementation = "sdpa"
    return config


@lru_cache(maxsize=64)
def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, for sharded and single-file checkpoints."""
    index = path / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ModelError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no weight map")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = path / _SINGLE_FILE
    if not single.is_file():
        raise ModelError(f"{path} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")
    with safe_open(single, framework="pt") as f:
        return {name: _SINGLE_FILE for name in f.keys()}


def _weight_map_for(path: str | Path) -> dict[str, str]:
    return _weight_map(Path(path).resolve())


def read_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read exactly the tensors ``names`` (as stored) from the checkpoint at ``path``."""
    path = Path(path)
    weight_map = _weight_map_for(path)
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise ModelError(f"{path} lacks tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file_name, file_names in by_file.items():
        try:
            with safe_open(path / file_name, framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        except (OSError, RuntimeError) as e:  # safetensors raises these for missing or corrupt files
            raise ModelError(f"cannot read {file_name} of {path}: {e}") from e
    return tensors


def block_tensor_names(path: str | Path, index: int) -> list[str]:
    prefix = block_prefix(index)
    names = sorted(n for n in _weight_map_for(path) if n.startswith(prefix))
    if not names:
        raise ModelError(f"{path} has no tensors for block {index}")
    return names


def _digest_tensors(tensors: dict[str, torch.Tensor], strip: str = "") -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        header = f"{name.removeprefix(strip)}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n"
        digest.update(header.encode())
        digest.update(memoryview(raw.numpy()).cast("B"))
    return digest.hexdigest()


def block_digest(path: str | Path, index: int) -> str:
    """sha256 over block ``index``'s tensors: names relative to the block, dtype, shape, bytes."""
    return _digest_tensors(read_tensors(path, block_tensor_names(path, index)), strip=block_prefix(index))


def _client_tensor_names(path: str | Path) -> list[str]:
    weight_map = _weight_map_for(path)
    return [n for n in CLIENT_TENSORS if n in weight_map]


def client_digest(path: str | Path) -> str:
    """sha256 over the client-side tensors (embeddings, final norm, LM head when untied)."""
    return _digest_tensors(read_tensors(path, _client_tensor_names(path)))


def _config_essentials(config: PretrainedConfig) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
            "sliding_window")
    return {k: getattr(config, k, None) for k in keys}


def _fingerprint(path: Path) -> tuple:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=32)
def _model_digest_cached(path: Path, fingerprint: tuple) -> str:
    config = load_config(path)
    digest = hashlib.sha256(json.dumps(_config_essentials(config), sort_keys=True).encode())
    for index in range(config.num_hidden_layers):
        digest.update(block_digest(path, index).encode())
    digest.update(client_digest(path).encode())
    return digest.hexdigest()


def model_digest(path: str | Path) -> str:
    """sha256 over the config essentials, every block digest and the client-part digest.

    Reads every weight once per process (cached on file sizes and modification times).
    """
    path = Path(path).resolve()
    return _model_digest_cached(path, _fingerprint(path))


@dataclass(frozen=True)
class ModelInfo:
    """What the swarm needs to know about a checkpoint."""

    path: Path
    model_id: str  # "<directory name>-<first 12 hex of the model digest>", safe as a DHT key prefix
    arch: str
    num_blocks: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    torch_dtype: str
    digest: str


def load_model_info(path: str | Path) -> ModelInfo:
    path = Path(path).resolve()
    config = load_config(path)
    digest = model_digest(path)
    name = _NAME_CHARS.sub("-", path.name).strip("-.")[:100] or "model"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return ModelInfo(
        path=path, model_id=f"{name}-{digest[:12]}", arch=config.model_type, num_blocks=config.num_hidden_layers,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim, torch_dtype=dtype, digest=digest,
    )
