"""Generating small, deterministic checkpoints and tokenizers for tests and the demo.

No model hub is reachable from where Hivemart is tested, so the project makes its own
models: a real ``save_pretrained`` checkpoint of a Llama-family architecture with weights
drawn from a seeded generator, and a byte-level BPE tokenizer trained on a text shipped
with the package. Identical arguments give identical bytes in every file.

Initialisation: linear weights ~ N(0, 1/fan_in) and embeddings ~ N(0, 1) rather than the
usual N(0, 0.02). With the usual scale a small random model's logits are nearly flat and
greedy decoding repeats one token; with these scales generations vary from token to token,
which makes exact-match tests meaningful, and logit gaps are wide enough that numerical
noise between devices does not flip tokens.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from client_sdk.errors import ModelError
from client_sdk.models.checkpoint import SUPPORTED_ARCHS

__all__ = ["create_model", "build_tokenizer"]

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the shipped corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("client_sdk.models").joinpath("data/corpus.txt").read_text()
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False)


def _initialise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02, generator=generator)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=generator)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)


def create_model(out_dir: str | Path, *, arch: str = "llama", hidden: int = 512, layers: int = 8, seed: int = 0,
                 heads: int | None = None, kv_heads: int | None = None, intermediate: int | None = None,
                 vocab_size: int | None = None, max_position: int = 2048, dtype: str = "float32",
                 max_shard_size: str | int | None = None, tie_embeddings: bool = False,
                 overwrite: bool = False) -> Path:
    """Write a checkpoint and tokenizer to ``out_dir`` and return its path."""
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"unsupported architecture {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if dtype not in _DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    heads = heads or max(2, hidden // 64)
    kv_heads = kv_heads or heads
    if hidden < 8 or layers < 1 or hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ModelError(f"hidden {hidden} must split into {heads} heads of even size, and {heads} heads into "
                         f"{kv_heads} key/value heads; layers must be >= 1")
    if vocab_size is not None and vocab_size < 300:
        raise ModelError("vocab_size must be at least 300 (256 bytes, special tokens and some merges)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ModelError(f"{out} exists and is not empty; choose another directory or pass --force")
        shutil.rmtree(out)

    # The shipped corpus supports about 900 merges; by default the model's vocabulary is
    # exactly the tokenizer's, so that every token the model can emit decodes to text.
    tokenizer = build_tokenizer(vocab_size or 2048)
    vocab_size = max(vocab_size or 0, len(tokenizer))
    config = _CONFIGS[arch](
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or (hidden * 11 // 4 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype,
        **({"sliding_window": None} if arch in ("mistral", "qwen2") else {}),
    )
    torch.manual_seed(seed)  # transformers' own init runs first; ours then overwrites every weight
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _initialise(model, seed)
    model = model.to(_DTYPES[dtype])
    model.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size or "10GB")
    tokenizer.save_pretrained(out)
    return out
