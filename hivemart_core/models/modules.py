"""The real ``transformers`` modules of one block, or of the client side, built from a
checkpoint without materialising the rest of the model.

Modules are constructed on the meta device (no memory, no random initialisation) and then
take the checkpoint's tensors with ``load_state_dict(assign=True)``, so loading a block
costs one read of its weights and nothing more.

Running blocks standalone, as ``LlamaModel.forward`` would::

    parts = load_client_parts(path)
    blocks = load_blocks(path, 0, n)
    rotary = make_rotary_embedding(load_config(path))
    hidden = parts.embed(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    cos_sin = rotary(hidden, position_ids)
    for block in blocks:
        hidden = block(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        # transformers 4.57 decoder layers return the hidden states (older ones a tuple)
    logits = parts.logits(hidden)

``attention_mask=None`` with ``sdpa`` means causal attention over the whole sequence, which
is what ``LlamaModel`` passes for unpadded input.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PretrainedConfig

from hivemart_core.errors import ModelError
from hivemart_core.models.checkpoint import (
    _check_index,
    block_prefix,
    block_tensor_names,
    client_tensor_names,
    digest_tensors,
    load_config,
    read_tensors,
)

__all__ = ["load_block", "load_blocks", "make_rotary_embedding", "ClientParts", "load_client_parts"]

_M = TypeVar("_M", bound=torch.nn.Module)


# model_type -> (modeling module, class-name prefix)
_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}


def _arch_class(config: PretrainedConfig, suffix: str) -> type[torch.nn.Module]:
    if config.model_type not in _CLASSES:
        raise ModelError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(_CLASSES)}")
    module_name, prefix = _CLASSES[config.model_type]
    cls: type[torch.nn.Module] = getattr(importlib.import_module(module_name), prefix + suffix)
    return cls


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ModelError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")


def _materialise(
    module: _M,
    state: dict[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> _M:
    """Give a meta-device ``module`` the tensors ``state``, strictly, then cast and move it."""
    expected = {name: t for name, t in module.state_dict().items()}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ModelError(f"{what} does not match its architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelError(
                f"{what}: tensor {name} has shape {list(tensor.shape)}, expected {list(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise ModelError(f"{what}: tensor {name} is stored as {tensor.dtype}, expected floating point")
    device = torch.device(device)
    # Move first, then cast: accelerators cast far faster than the CPU does.
    state = {k: v.to(device).to(dtype or v.dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _build_block(
    config: PretrainedConfig,
    index: int,
    tensors: dict[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> torch.nn.Module:
    layer_class = _arch_class(config, "DecoderLayer")
    with torch.device("meta"):
        layer = layer_class(config, layer_idx=index)
    prefix = block_prefix(index)
    return _materialise(layer, {k.removeprefix(prefix): v for k, v in tensors.items()}, what, dtype, device)


def load_block(
    path: str | Path,
    index: int,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    expected_digest: str | None = None,
) -> torch.nn.Module:
    """Block ``index`` as the architecture's decoder layer, reading only that block's tensors.

    Returns ``LlamaDecoderLayer`` / ``MistralDecoderLayer`` / ``Qwen2DecoderLayer`` with
    ``layer_idx == index`` (so it indexes a KV cache by its global position), in eval mode
    with gradients off, its weights cast to ``dtype`` (default: as stored) on ``device``.
    With ``expected_digest`` the block's digest is computed from the very bytes loaded and
    a mismatch raises :class:`ModelError`. Raises :class:`ModelError` for an index out of
    range or tensors that do not fit the architecture (missing, unexpected, misshapen).
    """
    _check_dtype(dtype)
    config = load_config(path)
    _check_index(config, index, path)
    tensors = read_tensors(path, block_tensor_names(path, index))
    if expected_digest is not None:
        actual = digest_tensors(tensors, tag="hivemart-block-v1", strip=block_prefix(index))
        if actual != expected_digest:
            raise ModelError(f"block {index} of {path} has digest {actual[:16]}..., expected {expected_digest[:16]}...")
    return _build_block(config, index, tensors, f"block {index} of {path}", dtype, device)


def load_blocks(
    path: str | Path, start: int, end: int, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> list[torch.nn.Module]:
    """Blocks ``[start, end)``, each as :func:`load_block` returns it."""
    config = load_config(path)
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= config.num_hidden_layers):
        raise ModelError(f"blocks {start}:{end} are not a non-empty range within {path}'s 0:{config.num_hidden_layers}")
    return [load_block(path, i, dtype=dtype, device=device) for i in range(start, end)]


def make_rotary_embedding(config: PretrainedConfig, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model-level rotary module for ``config``: ``rotary(hidden, position_ids) -> (cos, sin)``.

    ``cos`` and ``sin`` come out in ``hidden``'s dtype, shaped ``[batch, seq, head_dim]``,
    ready to pass to a decoder layer as ``position_embeddings``.
    """
    return _arch_class(config, "RotaryEmbedding")(config=config, device=torch.device(device))


class ClientParts(torch.nn.Module):
    """Embeddings, final norm and LM head: the part of the model a client runs itself.

    ``lm_head.weight`` is the embedding matrix itself when the checkpoint ties them.
    """

    def __init__(self, embed_tokens: torch.nn.Embedding, norm: torch.nn.Module, lm_head: torch.nn.Linear) -> None:
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[batch, seq]`` -> hidden states ``[batch, seq, hidden]``."""
        hidden: torch.Tensor = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden states -> logits ``[batch, seq, vocab]``."""
        logits: torch.Tensor = self.lm_head(self.norm(hidden.to(self.lm_head.weight.device, self.dtype)))
        return logits


def _padding_idx(config: PretrainedConfig) -> int | None:
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None


def load_client_parts(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ClientParts:
    """The client-side modules, tied or untied, without reading any block."""
    _check_dtype(dtype)
    config = load_config(path)
    tensors = read_tensors(path, client_tensor_names(path))
    if "model.embed_tokens.weight" not in tensors or "model.norm.weight" not in tensors:
        raise ModelError(f"{path} lacks the embeddings or the final norm")
    tied = "lm_head.weight" not in tensors
    if tied and not getattr(config, "tie_word_embeddings", False):
        raise ModelError(f"{path} has no lm_head.weight and does not tie it to the embeddings")
    with torch.device("meta"):
        embed = torch.nn.Embedding(config.vocab_size, config.hidden_size, _padding_idx(config))
        norm = _arch_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    embed = _materialise(
        embed, {"weight": tensors["model.embed_tokens.weight"]}, f"embeddings of {path}", dtype, device
    )
    norm = _materialise(norm, {"weight": tensors["model.norm.weight"]}, f"final norm of {path}", dtype, device)
    if tied:
        head.weight = embed.weight
        head = head.eval().requires_grad_(False)
    else:
        head = _materialise(head, {"weight": tensors["lm_head.weight"]}, f"LM head of {path}", dtype, device)
    return ClientParts(embed, norm, head)
