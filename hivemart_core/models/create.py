"""Generating small, deterministic checkpoints and tokenizers for tests, benchmarks and the demo.

No model hub is reachable from where Hivemart is tested, so the project makes its own
models: a real ``save_pretrained`` checkpoint (safetensors, sharded on request) of a
Llama-family architecture with weights drawn from a seeded ``torch.Generator``, and a
byte-level BPE tokenizer trained with the ``tokenizers`` library on ``data/corpus.txt``
(see ``data/generate_corpus.py``). Identical arguments give identical bytes in every file,
on any machine with the same pinned torch, transformers and tokenizers.

Initialisation: every 2-D weight ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases
~ N(0, 0.02), norms = 1, drawn in a fixed order (sorted parameter names) in float32 and then
cast to the storage dtype. This is larger than transformers' usual N(0, 0.02): with that,
a small random model's logits are nearly flat and greedy decoding repeats one token; with
these scales generations vary from token to token, which makes exact-match tests
meaningful, and logit gaps are wide enough that numerical noise between devices rarely
flips a greedy choice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from hivemart_core.errors import ModelError
from hivemart_core.models.checkpoint import SUPPORTED_ARCHS, write_digest_file

__all__ = ["create_model", "build_tokenizer", "CHAT_TEMPLATE", "DTYPES"]

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIN_VOCAB = 300  # 256 byte tokens, the special tokens, and a few merges
_MAX_VOCAB = 1 << 20
DEFAULT_VOCAB = 2048


@lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("hivemart_core.models").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    text: str = tokenizer.to_str()
    return text


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB, *, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, trained on the shipped corpus.

    Deterministic. The corpus supports a few thousand merges; a larger vocabulary is
    completed with added tokens ``<|extra_0|>``, ``<|extra_1|>``, ... (as real checkpoints pad
    their vocabularies), so every id a model can emit still decodes to text.
    """
    from tokenizers import Tokenizer

    if not isinstance(vocab_size, int) or not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ModelError(f"vocab_size must be an integer in {_MIN_VOCAB}..{_MAX_VOCAB}, not {vocab_size!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        # What a llama's forward takes: no ``token_type_ids``, which ``generate(**enc)`` refuses.
        model_input_names=["input_ids", "attention_mask"],
    )
    # Chat models ship their template; ours frames each turn with the existing <s>/</s> tokens
    # (new special tokens would change the vocabulary, hence the weights and the model id).
    tokenizer.chat_template = CHAT_TEMPLATE
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    return tokenizer


def _initialise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a generator seeded with ``seed`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02, generator=generator)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=generator)
            elif param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
            else:
                raise ModelError(f"no initialisation rule for parameter {name} of shape {list(param.shape)}")


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{name} must be a positive integer, not {value!r}")
    return value


def _prepare_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ModelError(f"{out} exists and is not empty; choose another directory or pass --force")
        # --force replaces checkpoints, never arbitrary directories a typo might point at.
        if not (out / "config.json").is_file():
            raise ModelError(f"{out} is not empty and holds no checkpoint (no config.json); refusing to replace it")


def create_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden: int = 512,
    layers: int = 8,
    seed: int = 0,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab_size: int | None = None,
    max_position: int = 2048,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    tie_embeddings: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a deterministic checkpoint and tokenizer to ``out_dir`` and return its path.

    - ``arch``: one of :data:`SUPPORTED_ARCHS`; ``hidden``, ``layers``: model size.
    - ``heads``: attention heads (default ``max(2, hidden // 64)``); ``kv_heads``: key/value
      heads for grouped-query attention (default ``heads``); must divide ``heads``.
    - ``intermediate``: MLP width (default about 2.75 x hidden, rounded up to a multiple of 64).
    - ``vocab_size``: default 2048; the tokenizer is trained to exactly this size.
    - ``dtype``: storage dtype, ``float32``, ``float16`` or ``bfloat16``.
    - ``max_shard_size``: e.g. ``"200KB"`` to write a sharded checkpoint with an index.
    - ``tie_embeddings``: share the embedding matrix with the LM head (default untied).
    - ``overwrite``: replace an existing checkpoint in ``out_dir``; without it a non-empty
      ``out_dir`` is an error. A non-empty directory without ``config.json`` is never replaced.

    The directory also gets ``hivemart-digests.json`` (see ``checkpoint``). The checkpoint is
    assembled in a temporary sibling directory and renamed into place, so a failure never
    leaves half a checkpoint at ``out_dir``. Raises :class:`ModelError` for invalid arguments.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"unsupported architecture {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    hidden, layers, max_position = (
        _positive("hidden", hidden),
        _positive("layers", layers),
        _positive("max_position", max_position),
    )
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ModelError(f"seed must be a non-negative integer, not {seed!r}")
    heads = _positive("heads", heads if heads is not None else max(2, hidden // 64))
    kv_heads = _positive("kv_heads", kv_heads if kv_heads is not None else heads)
    intermediate = _positive(
        "intermediate", intermediate if intermediate is not None else (hidden * 11 // 4 + 63) // 64 * 64
    )
    if hidden % heads or (hidden // heads) % 2:
        raise ModelError(f"hidden {hidden} must split into {heads} heads of even size (rotary embeddings pair dims)")
    if heads % kv_heads:
        raise ModelError(f"{heads} attention heads must be a multiple of {kv_heads} key/value heads")
    if max_shard_size is not None and not isinstance(max_shard_size, (str, int)):
        raise ModelError(f"max_shard_size must be a size like '200KB' or a number of bytes, not {max_shard_size!r}")

    out = Path(out_dir).absolute()
    _prepare_target(out, overwrite)
    tokenizer = build_tokenizer(vocab_size if vocab_size is not None else DEFAULT_VOCAB, model_max_length=max_position)
    config = _CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
        # Full attention everywhere, so blocks run standalone need no sliding-window mask.
        **({"sliding_window": None} if arch in ("mistral", "qwen2") else {}),
    )
    # Built on the meta device and then given empty storage: transformers' own random
    # initialisation would cost time (and touch the global RNG) only to be overwritten.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    _initialise(model, seed)
    model = model.to(DTYPES[dtype])
    model.generation_config.do_sample = False

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size or "10GB")
        except ValueError as e:  # an unparseable max_shard_size
            raise ModelError(f"cannot save the checkpoint: {e}") from e
        tokenizer.save_pretrained(staging)
        write_digest_file(staging)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _install(staging: Path, out: Path) -> None:
    """Move the finished checkpoint in ``staging`` to ``out``, replacing what is there."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
    # mkdtemp makes 0700 directories; a checkpoint is ordinary data that others may read.
    os.chmod(out, 0o755)
