"""Models: deterministic checkpoints, per-block loading, and digests of weights.

Supported: decoder-only checkpoints of the Llama family (Llama, Mistral, Qwen2) saved with
``save_pretrained`` as safetensors, sharded or not, in any floating-point dtype.

- :func:`create_model` writes a small deterministic checkpoint and tokenizer (tests, demo).
- :func:`load_config`, :func:`load_model_info` describe a checkpoint; ``ModelInfo.model_id``
  is the swarm's name for it.
- :func:`load_block`, :func:`load_blocks` build the real ``transformers`` decoder layers of
  some blocks, reading only their tensors; :func:`make_rotary_embedding` gives the
  ``(cos, sin)`` they take; :func:`load_client_parts` the embeddings, final norm and head.
- :func:`block_digest`, :func:`client_digest`, :func:`model_digest` prove which weights a
  peer holds (encoding in :mod:`hivemart_core.models.checkpoint`).

Everything raises :class:`hivemart_core.errors.ModelError` for a missing, malformed or
unsupported checkpoint. This package imports torch and transformers; ``client_sdk`` itself
does not import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hivemart_core.models.checkpoint import (
    ATTN_IMPLEMENTATION,
    DIGEST_FILE,
    SUPPORTED_ARCHS,
    ModelInfo,
    block_digest,
    client_digest,
    compute_digests,
    load_config,
    load_model_info,
    model_digest,
    model_id_for,
    write_digest_file,
)
from hivemart_core.models.create import DTYPES, build_tokenizer, create_model
from hivemart_core.models.modules import ClientParts, load_block, load_blocks, load_client_parts, make_rotary_embedding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SUPPORTED_ARCHS",
    "ATTN_IMPLEMENTATION",
    "DIGEST_FILE",
    "DTYPES",
    "ModelInfo",
    "ClientParts",
    "create_model",
    "build_tokenizer",
    "load_config",
    "load_model_info",
    "model_id_for",
    "load_block",
    "load_blocks",
    "make_rotary_embedding",
    "load_client_parts",
    "block_digest",
    "client_digest",
    "model_digest",
    "compute_digests",
    "write_digest_file",
    "load_tokenizer",
]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (a ``transformers.PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    from hivemart_core.errors import ModelError

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{path} has no tokenizer (tokenizer.json): copy the tokenizer files of the model into "
            f"it (`hivemart model create` writes them with the checkpoint)"
        )
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        return tokenizer
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {e}") from e
