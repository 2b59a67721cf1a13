"""Building the real ``transformers`` modules of one block, or of the client side, from a
checkpoint without materialising the rest of the model."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from transformers import PretrainedConfig

from client_sdk.errors import ModelError
from client_sdk.models.checkpoint import (
    _client_tensor_names, block_prefix, block_tensor_names, load_config, read_tensors,
)

__all__ = ["load_block", "load_blocks", "make_rotary_embedding", "ClientParts", "load_client_parts"]

# model_type -> (modeling module, class-name prefix)
_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}


def _arch_class(config: PretrainedConfig, suffix: str) -> type:
    module_name, prefix = _CLASSES[config.model_type]
    return getattr(importlib.import_module(module_name), prefix + suffix)


def _materialise(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                 dtype: torch.dtype | None, device: str | torch.device) -> torch.nn.Module:
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    expected = set(module.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ModelError(f"{what} does not match its architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, tensor in state.items():
        wanted = module.state_dict()[name].shape
        if tensor.shape != wanted:
            raise ModelError(f"{what}: tensor {name} has shape {list(tensor.shape)}, expected {list(wanted)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval().requires_grad_(False)


def load_block(path: str | Path, index: int, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Block ``index`` as the architecture's decoder layer, reading only its tensors."""
    config = load_config(path)
    if not 0 <= index < config.num_hidden_layers:
        raise ModelError(f"block {index} is outside the model's 0..{config.num_hidden_layers - 1}")
    prefix = block_prefix(index)
    tensors = read_tensors(path, block_tensor_names(path, index))
    layer_class = _arch_class(config, "DecoderLayer")
    with torch.device("meta"):
        layer = layer_class(config, layer_idx=index)
    return _materialise(layer, {k.removeprefix(prefix): v for k, v in tensors.items()}, f"block {index} of {path}",
                        dtype, device)


def load_blocks(path: str | Path, start: int, end: int, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> list[torch.nn.Module]:
    """Blocks ``[start, end)``."""
    if not start < end:
        raise ModelError(f"empty block range {start}:{end}")
    return [load_block(path, i, dtype=dtype, device=device) for i in range(start, end)]


def make_rotary_embedding(config: PretrainedConfig, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model-level rotary module: ``rotary(hidden, position_ids) -> (cos, sin)``."""
    return _arch_class(config, "RotaryEmbedding")(config=config, device=torch.device(device))


class ClientParts(torch.nn.Module):
    """Embeddings, final norm and LM head: the part of the model a client runs itself."""

    def __init__(self, embed_tokens: torch.nn.Embedding, norm: torch.nn.Module, lm_head: torch.nn.Linear) -> None:
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.device, self.dtype)))


def load_client_parts(path: str | Path, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> ClientParts:
    """The client-side modules, tied or untied, without reading any block."""
    config = load_config(path)
    tensors = read_tensors(path, _client_tensor_names(path))
    if "model.embed_tokens.weight" not in tensors or "model.norm.weight" not in tensors:
        raise ModelError(f"{path} lacks the embeddings or the final norm")
    embed_weight = tensors["model.embed_tokens.weight"]
    head_weight = tensors.get("lm_head.weight")
    if head_weight is None:
        if not getattr(config, "tie_word_embeddings", False):
            raise ModelError(f"{path} has no lm_head.weight and does not tie it to the embeddings")
        head_weight = embed_weight
    with torch.device("meta"):
        embed = torch.nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        norm = _arch_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    embed = _materialise(embed, {"weight": embed_weight}, f"embeddings of {path}", dtype, device)
    norm = _materialise(norm, {"weight": tensors["model.norm.weight"]}, f"final norm of {path}", dtype, device)
    head = _materialise(head, {"weight": head_weight}, f"LM head of {path}", dtype, device)
    return ClientParts(embed, norm, head)
