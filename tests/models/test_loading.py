"""Per-block loading: the real decoder layers, reading only their tensors, reproduce the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hivemart_core.models.checkpoint as checkpoint
from hivemart_core.errors import ModelError
from hivemart_core.models import (
    ATTN_IMPLEMENTATION,
    ClientParts,
    block_digest,
    load_block,
    load_blocks,
    load_client_parts,
    load_config,
    load_model_info,
    make_rotary_embedding,
)
from tests.models.conftest import ARCH_SHAPES

LAYER_CLASSES = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
INPUT_IDS = torch.tensor([[5, 300, 17, 1024, 77, 9, 1500, 42, 8, 640, 3, 1999]])


def blockwise_logits(
    path: Path, input_ids: torch.Tensor, *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> torch.Tensor:
    """Embed, run every block standalone with rotary position embeddings, norm, LM head."""
    config = load_config(path)
    parts = load_client_parts(path, dtype=dtype, device=device)
    rotary = make_rotary_embedding(config, device=device)
    with torch.inference_mode():
        hidden = parts.embed(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=device)[None]
        position_embeddings = rotary(hidden, position_ids)
        for index in range(config.num_hidden_layers):
            block = load_block(path, index, dtype=dtype, device=device)
            # attention_mask=None: causal attention over the whole sequence, as LlamaModel does with sdpa
            out = block(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return parts.logits(hidden)


def reference_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids).logits


@pytest.mark.parametrize("arch", list(ARCH_SHAPES))
def test_blocks_reproduce_the_full_model(make_model, arch: str) -> None:
    path = make_model(**ARCH_SHAPES[arch])
    expected = reference_logits(path, INPUT_IDS)
    actual = blockwise_logits(path, INPUT_IDS)
    assert actual.shape == expected.shape == (1, INPUT_IDS.shape[1], load_config(path).vocab_size)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCH_SHAPES))
def test_block_is_the_real_decoder_layer(make_model, arch: str) -> None:
    path = make_model(**ARCH_SHAPES[arch])
    block = load_block(path, 2)
    assert type(block).__name__ == LAYER_CLASSES[arch]
    assert block.self_attn.layer_idx == 2
    assert block.self_attn.config._attn_implementation == ATTN_IMPLEMENTATION
    assert not block.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in block.parameters())
    info = load_model_info(path)
    assert block.self_attn.k_proj.out_features == info.num_kv_heads * info.head_dim
    assert (block.self_attn.q_proj.bias is not None) == (arch == "qwen2")


def test_load_blocks_returns_the_span(make_model) -> None:
    path = make_model(arch="llama")
    blocks = load_blocks(path, 1, 3)
    assert [b.self_attn.layer_idx for b in blocks] == [1, 2]
    with pytest.raises(ModelError):
        load_blocks(path, 2, 2)
    with pytest.raises(ModelError):
        load_blocks(path, 1, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_on_load(make_model, dtype: torch.dtype) -> None:
    path = make_model(arch="mistral", kv_heads=2)
    block = load_block(path, 0, dtype=dtype)
    parts = load_client_parts(path, dtype=dtype)
    assert {p.dtype for p in block.parameters()} == {dtype}
    assert {p.dtype for p in parts.parameters()} == {dtype}
    logits = blockwise_logits(path, INPUT_IDS, dtype=dtype)
    assert logits.dtype == dtype
    expected = reference_logits(path, INPUT_IDS)
    # Half precision: the same computation, rounded; agreement far above chance, not exact.
    assert torch.isfinite(logits).all()
    agree = (logits.float().argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.75


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_precision_checkpoint_loads_as_stored_or_cast(make_model, stored: str) -> None:
    path = make_model(arch="llama", dtype=stored)
    block = load_block(path, 1)
    assert {p.dtype for p in block.parameters()} == {getattr(torch, stored)}
    assert load_model_info(path).torch_dtype == stored
    upcast = load_block(path, 1, dtype=torch.float32)
    assert torch.equal(upcast.mlp.up_proj.weight, block.mlp.up_proj.weight.float())


def test_tied_embeddings(make_model) -> None:
    path = make_model(arch="qwen2", kv_heads=2, tie_embeddings=True)
    assert "lm_head.weight" not in checkpoint.client_tensor_names(path)
    parts = load_client_parts(path)
    assert isinstance(parts, ClientParts) and parts.tied
    torch.testing.assert_close(blockwise_logits(path, INPUT_IDS), reference_logits(path, INPUT_IDS), rtol=0, atol=1e-5)


class SafeOpenSpy:
    """Wraps ``safe_open`` to record which files are opened and which tensors are read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: list[str] = []
        self.tensors: list[str] = []
        real = checkpoint.safe_open
        spy = self

        class Spied:
            def __init__(self, file, *args, **kwargs) -> None:
                spy.files.append(Path(file).name)
                self._inner = real(file, *args, **kwargs)

            def __enter__(self):
                self._handle = self._inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

            def keys(self):
                return self._handle.keys()

            def get_tensor(self, name):
                spy.tensors.append(name)
                return self._handle.get_tensor(name)

        monkeypatch.setattr(checkpoint, "safe_open", Spied)


@pytest.mark.parametrize("sharded", [False, True])
def test_load_block_reads_only_its_tensors(make_model, monkeypatch: pytest.MonkeyPatch, sharded: bool) -> None:
    path = make_model(arch="llama", max_shard_size="100KB" if sharded else None)
    weight_map = checkpoint._weight_map(path.resolve())  # cached before spying: the header read is not a tensor read
    spy = SafeOpenSpy(monkeypatch)
    load_block(path, 1)
    assert spy.tensors and all(name.startswith("model.layers.1.") for name in spy.tensors)
    assert sorted(spy.tensors) == sorted(n for n in weight_map if n.startswith("model.layers.1."))
    assert set(spy.files) == {weight_map[n] for n in spy.tensors}
    if sharded:
        assert len(set(weight_map.values())) > 2 and len(set(spy.files)) < len(set(weight_map.values()))


def test_client_parts_read_no_block(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_model(arch="llama")
    checkpoint._weight_map(path.resolve())
    spy = SafeOpenSpy(monkeypatch)
    load_client_parts(path)
    assert sorted(spy.tensors) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


@pytest.mark.parametrize("index", [-1, 3, 100, True, 1.0])
def test_out_of_range_block_is_rejected(make_model, index) -> None:
    with pytest.raises(ModelError, match="outside"):
        load_block(make_model(arch="llama"), index)


def _rewrite(path: Path, change) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "missing"),
        (lambda t: t.__setitem__("model.layers.1.self_attn.extra.weight", torch.zeros(2)), "unexpected"),
        (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 64)), "shape"),
        (
            lambda t: t.__setitem__("model.layers.1.input_layernorm.weight", torch.zeros(64, dtype=torch.int32)),
            "floating point",
        ),
    ],
)
def test_tampered_block_is_rejected(make_model, copy_model, tamper, message: str) -> None:
    path = copy_model(make_model(arch="llama"))
    _rewrite(path, tamper)
    with pytest.raises(ModelError, match=message):
        load_block(path, 1)
    load_block(path, 0)  # the other blocks are untouched and still load


def test_corrupt_or_missing_weights_are_rejected(make_model, copy_model) -> None:
    path = copy_model(make_model(arch="llama"))
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated: header promises more than there is
    with pytest.raises(ModelError):
        load_block(path, 1)
    file.unlink()
    with pytest.raises(ModelError, match="model.safetensors"):
        load_block(path, 1)


def test_index_cannot_point_outside_the_checkpoint(make_model, copy_model) -> None:
    path = copy_model(make_model(arch="llama", max_shard_size="100KB"))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../elsewhere.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelError, match="invalid shard name"):
        load_block(path, 0)


def test_expected_digest_is_checked_against_the_loaded_bytes(make_model) -> None:
    path = make_model(arch="llama")
    good = block_digest(path, 1)
    assert load_block(path, 1, expected_digest=good).self_attn.layer_idx == 1
    with pytest.raises(ModelError, match="digest"):
        load_block(path, 1, expected_digest=block_digest(path, 2))


def test_unsupported_or_missing_checkpoints(make_model, copy_model, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a checkpoint"):
        load_block(tmp_path / "nowhere", 0)
    path = copy_model(make_model(arch="llama"))
    config = json.loads((path / "config.json").read_text())
    gpt2 = {**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ModelError, match="gpt2"):
        load_model_info(path)
    (path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ModelError, match="key/value heads"):
        load_block(path, 0)
    with pytest.raises(ModelError, match="dtype"):
        load_block(make_model(arch="llama"), 0, dtype=torch.int8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_on_cuda_match_the_cpu(make_model, dtype: torch.dtype) -> None:
    path = make_model(arch="mistral", kv_heads=2)
    block = load_block(path, 1, dtype=dtype, device="cuda")
    assert {p.device.type for p in block.parameters()} == {"cuda"}
    on_gpu = blockwise_logits(path, INPUT_IDS.cuda(), dtype=dtype, device="cuda").float().cpu()
    expected = reference_logits(path, INPUT_IDS)
    if dtype == torch.float32:
        torch.testing.assert_close(on_gpu, expected, rtol=1e-4, atol=1e-4)
    else:
        assert (on_gpu.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
