"""Models: deterministic checkpoints for tests and the demo, per-block loading, digests.

Supported: decoder-only checkpoints of the Llama family (Llama, Mistral, Qwen2) saved with
``save_pretrained`` as safetensors, sharded or not.
"""

from __future__ import annotations

from pathlib import Path

from client_sdk.models.checkpoint import (
    SUPPORTED_ARCHS, ModelInfo, block_digest, client_digest, load_config, load_model_info, model_digest,
)
from client_sdk.models.create import build_tokenizer, create_model
from client_sdk.models.modules import ClientParts, load_block, load_blocks, load_client_parts, make_rotary_embedding

__all__ = [
    "SUPPORTED_ARCHS", "ModelInfo", "ClientParts", "create_model", "build_tokenizer", "load_config",
    "load_model_info", "load_block", "load_blocks", "make_rotary_embedding", "load_client_parts",
    "block_digest", "client_digest", "model_digest", "load_tokenizer",
]


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (a ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    from client_sdk.errors import ModelError

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {e}") from e
