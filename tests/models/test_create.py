"""Generated checkpoints: deterministic, loadable by transformers, with a trained tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivemart_core.errors import ModelError
from hivemart_core.models import DIGEST_FILE, build_tokenizer, create_model, load_model_info, load_tokenizer
from tests.models.conftest import TINY

SAMPLE_TEXT = "The harbour was quiet before dawn; 12 gulls argued over 3.14 crates. Ça va? 東京 — ok!\n"


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_identical_arguments_give_identical_bytes(make_model, tmp_path: Path) -> None:
    first = make_model(arch="mistral", kv_heads=2)
    again = create_model(tmp_path / "again", **{**TINY, "arch": "mistral", "kv_heads": 2})
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",  # the chat template, as transformers saves it
        DIGEST_FILE,
    }
    assert set(files_of(first)) == expected
    assert files_of(again) == files_of(first)


def test_identical_bytes_in_a_fresh_process(make_model, tmp_path: Path) -> None:
    # A different process (and hash seed) must not change tokenizer training or weights.
    first = make_model(arch="llama", dtype="bfloat16")
    args = json.dumps({**TINY, "arch": "llama", "dtype": "bfloat16"})
    code = (
        "import json, sys; from hivemart_core.models import create_model; "
        "create_model(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "other"), args],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert files_of(tmp_path / "other") == files_of(first)


def test_a_different_seed_changes_the_weights_only(make_model) -> None:
    base, other = files_of(make_model(arch="llama")), files_of(make_model(arch="llama", seed=1))
    assert base["model.safetensors"] != other["model.safetensors"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert base[name] == other[name]


def test_sharded_and_unsharded_load_and_agree(make_model) -> None:
    single, sharded = make_model(arch="qwen2", kv_heads=2), make_model(arch="qwen2", kv_heads=2, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    ids = torch.tensor([[1, 200, 35, 1800, 4, 77, 512]])
    logits = []
    for path in (single, sharded):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert type(model).__name__ == "Qwen2ForCausalLM"
        with torch.inference_mode():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert load_model_info(single).model_id == load_model_info(sharded).model_id


def test_config_reflects_the_options(tmp_path: Path) -> None:
    path = create_model(
        tmp_path / "m",
        arch="mistral",
        hidden=96,
        layers=2,
        heads=6,
        kv_heads=3,
        intermediate=128,
        vocab_size=1000,
        max_position=512,
        dtype="float16",
        seed=3,
    )
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["vocab_size"],
        config["max_position_embeddings"],
        config["dtype"],
    ) == (96, 2, 6, 3, 128, 1000, 512, "float16")
    assert config["tie_word_embeddings"] is False
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F16"}
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [3 * 16, 96]
    assert len(AutoTokenizer.from_pretrained(path)) == 1000


def test_defaults_are_sensible(tmp_path: Path) -> None:
    path = create_model(tmp_path / "m", hidden=128, layers=1)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert config["intermediate_size"] == 384  # 2.75 x 128 = 352, rounded up to a multiple of 64
    assert config["vocab_size"] == 2048 and config["max_position_embeddings"] == 2048


def test_tokenizer_round_trips_text(make_model) -> None:
    tokenizer = load_tokenizer(make_model(arch="llama"))
    ids = tokenizer(SAMPLE_TEXT).input_ids
    assert tokenizer.decode(ids) == SAMPLE_TEXT
    english = "The harbour was quiet before dawn and the market square was full"
    assert len(tokenizer(english).input_ids) < len(english) / 3  # it learned merges, not just bytes
    assert len(tokenizer) == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")


@pytest.mark.parametrize("vocab_size", [300, 2048, 9000])
def test_tokenizer_has_exactly_the_requested_vocabulary(vocab_size: int) -> None:
    tokenizer = build_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    assert tokenizer.decode(tokenizer(SAMPLE_TEXT).input_ids) == SAMPLE_TEXT
    # Every id decodes to text, including padding tokens beyond what the corpus supports.
    assert tokenizer.decode([vocab_size - 1]) != ""


def test_greedy_generation_is_not_degenerate(make_model) -> None:
    path = make_model(arch="llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    prompt = tokenizer("The merchants counted their coins", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, prompt.shape[1] :].tolist()
    assert len(new) == 40 and len(set(new)) >= 20


def test_tied_checkpoint_has_no_lm_head_tensor(make_model) -> None:
    path = make_model(arch="llama", tie_embeddings=True)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(arch="gpt2"), "unsupported architecture"),
        (dict(dtype="int8"), "unsupported dtype"),
        (dict(hidden=0), "hidden"),
        (dict(layers=-1), "layers"),
        (dict(hidden=64, heads=3), "heads"),
        (dict(hidden=64, heads=4, kv_heads=3), "key/value heads"),
        (dict(hidden=60, heads=4), "even size"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(seed=-1), "seed"),
        (dict(max_shard_size="lots"), "cannot save"),
    ],
)
def test_invalid_arguments_are_rejected(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        create_model(tmp_path / "m", **{**TINY, **overrides})
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging directory left behind


def test_existing_directories(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    create_model(out, **TINY)  # an empty directory is fine
    with pytest.raises(ModelError, match="not empty"):
        create_model(out, **TINY)
    first = (out / "model.safetensors").read_bytes()
    create_model(out, **{**TINY, "seed": 7}, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="no checkpoint"):
        create_model(other, **TINY, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
