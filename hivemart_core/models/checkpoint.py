"""Reading Llama-family checkpoints tensor by tensor, digests of their weights, model ids.

Only the tensors asked for are read (``safetensors.safe_open``), so a provider serving
four blocks of a 70-block model never touches the other 66.

Digests
-------
A *block digest* is the sha256 of a canonical encoding of one block's tensors exactly as
stored in the checkpoint (so peers agree whatever dtype or device they run in)::

    b"hivemart-block-v1\\n"
    for each tensor, sorted by its name relative to the block ("mlp.down_proj.weight", ...):
        f"{name}\\t{dtype}\\t{d0,d1,...}\\t{nbytes}\\n"   (utf-8; dtype like "float32")
        raw little-endian bytes of the tensor

The *client digest* uses the same encoding (tag ``hivemart-client-v1``) over the embeddings,
the final norm and, when untied, the LM head, with their full names. The *model digest* is
the sha256 of ``hivemart-model-v1``, the config essentials as sorted JSON, every block
digest in order and the client digest, one per line.

Computing a digest means reading the weights, which for a large model takes minutes. So
:func:`model_digest` (and with it :func:`load_model_info` and the model id) uses a
``hivemart-digests.json`` beside the weights when there is one (``create_model`` writes it;
``hivemart model digest --write`` refreshes it), trusting it only while the sizes and a
sample of the contents of the files it describes are unchanged, and otherwise reads every
weight once per process. The file is a convenience for naming a model, not a proof: a
targeted edit of a few bytes can escape the sample. Whatever must be proved comes from the
weights themselves: :func:`block_digest` and ``load_block(..., expected_digest=...)`` never
consult the file, and ``model_digest(path, use_cache=False)`` reads everything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from hivemart_core.errors import ModelError

__all__ = [
    "SUPPORTED_ARCHS",
    "ATTN_IMPLEMENTATION",
    "DIGEST_FILE",
    "ModelInfo",
    "load_config",
    "load_model_info",
    "model_id_for",
    "read_tensors",
    "block_prefix",
    "block_tensor_names",
    "client_tensor_names",
    "digest_tensors",
    "block_digest",
    "client_digest",
    "model_digest",
    "compute_digests",
    "write_digest_file",
]

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2")

# Every module this package builds runs attention through torch's scaled_dot_product_attention:
# it supports float32, float16 and bfloat16 on CPU and CUDA in the torch Hivemart pins, and
# using one implementation everywhere keeps a provider's blocks numerically identical to a
# client's local AutoModelForCausalLM (which also defaults to sdpa).
ATTN_IMPLEMENTATION = "sdpa"

DIGEST_FILE = "hivemart-digests.json"
CLIENT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")
_DIGEST_VERSION = 1

logger = logging.getLogger(__name__)


def block_prefix(index: int) -> str:
    """The name prefix of block ``index``'s tensors in the checkpoint."""
    return f"model.layers.{index}."


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    return stat.st_size, stat.st_mtime_ns


def _positive_int(config: PretrainedConfig, key: str, path: Path) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{path}/config.json: {key} must be a positive integer, not {value!r}")
    return value


@lru_cache(maxsize=64)
def _load_config_cached(path: Path, stat: tuple[int, int]) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read the config of {path}: {e}") from e
    if config.model_type not in SUPPORTED_ARCHS:
        raise ModelError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(SUPPORTED_ARCHS)}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        _positive_int(config, key, path)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ModelError(f"{path}/config.json: {heads} attention heads do not split into {kv_heads} key/value heads")
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        raise ModelError(f"{path}/config.json: hidden_size {config.hidden_size} is not a multiple of {heads} heads")
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def load_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config, with ``_attn_implementation`` set to :data:`ATTN_IMPLEMENTATION`.

    Raises :class:`ModelError` when ``path`` holds no readable config, the architecture is
    not one of :data:`SUPPORTED_ARCHS`, or the sizes in it are inconsistent. Each call
    returns a fresh copy, so callers may modify it.
    """
    path = Path(path).resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{path} is not a checkpoint directory (no config.json); create one with `hivemart model create OUT`"
        )
    return copy.deepcopy(_load_config_cached(path, _stat_key(config_file)))


@lru_cache(maxsize=64)
def _weight_map_cached(path: Path, stat: tuple[int, int], indexed: bool) -> dict[str, str]:
    if indexed:
        index = path / _INDEX_FILE
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no weight map")
        for name, file_name in weight_map.items():
            # The index is data from whoever made the checkpoint: never follow it out of the directory.
            if not isinstance(file_name, str) or not _SHARD_NAME.match(file_name) or file_name.startswith("."):
                raise ModelError(f"{index} maps {name!r} to an invalid shard name {file_name!r}")
        return {str(k): v for k, v in weight_map.items()}
    single = path / _SINGLE_FILE
    try:
        with safe_open(single, framework="pt") as f:
            return {name: _SINGLE_FILE for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ModelError(f"cannot read {single}: {e}") from e


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, for sharded and single-file checkpoints."""
    index, single = path / _INDEX_FILE, path / _SINGLE_FILE
    if index.is_file():
        return _weight_map_cached(path, _stat_key(index), True)
    if single.is_file():
        return _weight_map_cached(path, _stat_key(single), False)
    raise ModelError(f"{path} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")


def read_tensors(path: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read exactly the tensors ``names`` (as stored: dtype unchanged, on the CPU).

    Opens only the shards that hold them. Raises :class:`ModelError` for a name the
    checkpoint lacks or a shard that is missing or corrupt.
    """
    path = Path(path).resolve()
    names = list(names)
    weight_map = _weight_map(path)
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
                present = set(f.keys())
                for name in file_names:
                    if name not in present:
                        raise ModelError(f"{file_name} of {path} lacks {name}, which its index places there")
                    tensors[name] = f.get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise ModelError(f"cannot read {file_name} of {path}: {e}") from e
    return tensors


def block_tensor_names(path: str | Path, index: int) -> list[str]:
    """Names of block ``index``'s tensors, sorted; ModelError when there are none."""
    prefix = block_prefix(index)
    names = sorted(n for n in _weight_map(Path(path).resolve()) if n.startswith(prefix))
    if not names:
        raise ModelError(f"{path} has no tensors for block {index}")
    return names


def client_tensor_names(path: str | Path) -> list[str]:
    """Names of the client-side tensors present (no ``lm_head.weight`` when tied)."""
    weight_map = _weight_map(Path(path).resolve())
    return [n for n in CLIENT_TENSORS if n in weight_map]


def digest_tensors(tensors: dict[str, torch.Tensor], *, tag: str, strip: str = "") -> str:
    """The canonical digest (see the module docstring) of ``tensors`` as given."""
    digest = hashlib.sha256(f"{tag}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # bytes as stored, whatever the dtype
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = ",".join(str(d) for d in tensor.shape)
        digest.update(f"{name.removeprefix(strip)}\t{dtype}\t{shape}\t{raw.nbytes}\n".encode())
        digest.update(raw.data)
    return digest.hexdigest()


def block_digest(path: str | Path, index: int) -> str:
    """sha256 of block ``index``'s tensors as stored, reading only that block's tensors."""
    config = load_config(path)
    _check_index(config, index, path)
    tensors = read_tensors(path, block_tensor_names(path, index))
    return digest_tensors(tensors, tag="hivemart-block-v1", strip=block_prefix(index))


def client_digest(path: str | Path) -> str:
    """sha256 of the client-side tensors (embeddings, final norm, LM head when untied)."""
    return digest_tensors(read_tensors(path, client_tensor_names(path)), tag="hivemart-client-v1")


def _check_index(config: PretrainedConfig, index: int, path: str | Path) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < config.num_hidden_layers:
        raise ModelError(f"block {index!r} is outside {path}'s blocks 0..{config.num_hidden_layers - 1}")


_ESSENTIALS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "sliding_window",
)


def _config_essentials(config: PretrainedConfig) -> dict[str, Any]:
    """What changes a model's outputs, beyond its weights."""
    return {k: getattr(config, k, None) for k in _ESSENTIALS}


def _combine(config: PretrainedConfig, blocks: list[str], client: str) -> str:
    digest = hashlib.sha256(b"hivemart-model-v1\n")
    digest.update(json.dumps(_config_essentials(config), sort_keys=True, default=str).encode() + b"\n")
    for block in blocks:
        digest.update(f"{block}\n".encode())
    digest.update(client.encode())
    return digest.hexdigest()


def _weight_files(path: Path) -> list[str]:
    names = set(_weight_map(path).values())
    if (path / _INDEX_FILE).is_file():
        names.add(_INDEX_FILE)
    return sorted(names)


_SAMPLE_WINDOWS, _SAMPLE_BYTES = 32, 4096


def _sampled_hash(file: Path) -> str:
    """sha256 of a file's size and 32 evenly spaced 4 KiB windows (the whole file if small).

    Cheap at any size and deterministic, so the digest file stays byte-identical for
    identical checkpoints; it notices re-saved or replaced weights, not a targeted edit.
    """
    try:
        size = file.stat().st_size
        digest = hashlib.sha256(f"{size}\n".encode())
        with open(file, "rb") as f:
            if size <= 2 * _SAMPLE_WINDOWS * _SAMPLE_BYTES:
                digest.update(f.read())
            else:
                for k in range(_SAMPLE_WINDOWS):
                    f.seek(k * (size - _SAMPLE_BYTES) // (_SAMPLE_WINDOWS - 1))
                    digest.update(f.read(_SAMPLE_BYTES))
    except OSError as e:
        raise ModelError(f"cannot read {file}: {e}") from e
    return digest.hexdigest()


def _content_fingerprint(path: Path) -> dict[str, str]:
    return {name: _sampled_hash(path / name) for name in _weight_files(path)}


def _stat_fingerprint(path: Path) -> str:
    return json.dumps({name: _stat_key(path / name) for name in _weight_files(path)}, sort_keys=True)


class Digests(TypedDict):
    """A checkpoint's digests, as :func:`compute_digests` returns them (hex strings)."""

    model: str
    client: str
    blocks: list[str]


def compute_digests(path: str | Path) -> Digests:
    """Every digest of the checkpoint, computed from its weights (reads all of them).

    Returns ``{"model": hex, "client": hex, "blocks": [hex, ...]}``.
    """
    path = Path(path).resolve()
    config = load_config(path)
    blocks = [block_digest(path, i) for i in range(config.num_hidden_layers)]
    client = client_digest(path)
    return {"model": _combine(config, blocks, client), "client": client, "blocks": blocks}


def write_digest_file(path: str | Path, digests: Digests | None = None) -> Path:
    """Write ``hivemart-digests.json`` (computing the digests unless given) and return its path."""
    path = Path(path).resolve()
    digests = digests or compute_digests(path)
    record = {
        "version": _DIGEST_VERSION,
        "files": _content_fingerprint(path),
        "client": digests["client"],
        "blocks": digests["blocks"],
    }
    target = path / DIGEST_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def _read_digest_file(path: Path, num_blocks: int) -> tuple[list[str], str] | None:
    """The cached block and client digests, or None if absent, malformed or stale."""
    file = path / DIGEST_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning(f"ignoring {file}: not valid JSON")
        return None
    hex64 = re.compile(r"^[0-9a-f]{64}$")
    if not isinstance(record, dict) or record.get("version") != _DIGEST_VERSION:
        logger.warning(f"ignoring {file}: unknown format")
        return None
    if record.get("files") != _content_fingerprint(path):
        logger.info(
            f"ignoring {file}: the weights changed since it was written; "
            f"refresh it with `hivemart model digest --write {path}`"
        )
        return None
    blocks, client = record.get("blocks"), record.get("client")
    if (
        not isinstance(blocks, list)
        or len(blocks) != num_blocks
        or not isinstance(client, str)
        or not all(isinstance(b, str) and hex64.match(b) for b in blocks + [client])
    ):
        logger.warning(f"ignoring {file}: malformed digests")
        return None
    return blocks, client


@lru_cache(maxsize=32)
def _model_digest_cached(path: Path, fingerprint: str, config_stat: tuple[int, int]) -> str:
    return compute_digests(path)["model"]


def model_digest(path: str | Path, *, use_cache: bool = True) -> str:
    """sha256 over the config essentials, every block digest and the client digest.

    With ``use_cache`` (the default) it takes block and client digests from a fresh
    ``hivemart-digests.json`` when there is one, and otherwise reads every weight once per
    process. ``use_cache=False`` always recomputes from the weights.
    """
    path = Path(path).resolve()
    config = load_config(path)
    if not use_cache:
        return compute_digests(path)["model"]
    cached = _read_digest_file(path, config.num_hidden_layers)
    if cached is not None:
        return _combine(config, *cached)
    return _model_digest_cached(path, _stat_fingerprint(path), _stat_key(path / "config.json"))


def model_id_for(config: PretrainedConfig, digest: str) -> str:
    """``"{arch}-{blocks}x{hidden}-{digest[:12]}"``, e.g. ``llama-8x512-3fa9c0d1e2b4``.

    Derived from the content only, so every copy of a checkpoint has the same id wherever
    it is stored and whatever its directory is called; the digest prefix (48 bits) tells
    different weights of the same shape apart. Only ``[A-Za-z0-9._-]``, as DHT keys need.
    """
    return f"{config.model_type}-{config.num_hidden_layers}x{config.hidden_size}-{digest[:12]}"


@dataclass(frozen=True)
class ModelInfo:
    """What the swarm needs to know about a checkpoint (see :func:`load_model_info`)."""

    path: Path  # absolute checkpoint directory
    model_id: str  # see model_id_for; the swarm's DHT key prefix
    arch: str  # "llama", "mistral" or "qwen2"
    num_blocks: int  # decoder layers
    hidden_size: int
    vocab_size: int
    num_heads: int  # attention (query) heads
    num_kv_heads: int  # key/value heads (fewer than num_heads with grouped-query attention)
    head_dim: int
    torch_dtype: str  # storage dtype from the config, e.g. "float32"
    digest: str = ""  # the model digest (hex sha256)


def load_model_info(path: str | Path) -> ModelInfo:
    """Describe the checkpoint at ``path``; ModelError if it is missing or unsupported.

    Needs the model digest, so the first call on a checkpoint without a fresh
    ``hivemart-digests.json`` reads every weight once (see :func:`model_digest`).
    """
    path = Path(path).resolve()
    config = load_config(path)
    digest = model_digest(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return ModelInfo(
        path=path,
        model_id=model_id_for(config, digest),
        arch=config.model_type,
        num_blocks=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        torch_dtype=dtype.removeprefix("torch."),
        digest=digest,
    )
