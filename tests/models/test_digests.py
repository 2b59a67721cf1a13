"""Digests of weights: canonical, per block, changed by one byte, and honest about the cache."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import hivemart_core.models.checkpoint as checkpoint
from hivemart_core.errors import ModelError
from hivemart_core.models import (
    DIGEST_FILE,
    block_digest,
    client_digest,
    compute_digests,
    load_model_info,
    model_digest,
    write_digest_file,
)
from hivemart_core.models.checkpoint import read_tensors
from tests.models.conftest import flip_byte
from tests.models.test_loading import SafeOpenSpy

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_block_digest_follows_the_documented_encoding(make_model) -> None:
    path = make_model(arch="qwen2", kv_heads=2)
    prefix = "model.layers.1."
    tensors = read_tensors(path, [n for n in checkpoint._weight_map(path.resolve()) if n.startswith(prefix)])
    expected = hashlib.sha256(b"hivemart-block-v1\n")
    for name in sorted(tensors):
        tensor = tensors[name]
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        shape = ",".join(map(str, tensor.shape))
        expected.update(f"{name.removeprefix(prefix)}\tfloat32\t{shape}\t{len(raw)}\n".encode() + raw)
    assert block_digest(path, 1) == expected.hexdigest()
    assert "self_attn.q_proj.bias" in {n.removeprefix(prefix) for n in tensors}


def test_digests_are_stable_and_distinct(make_model) -> None:
    path = make_model(arch="llama")
    digests = compute_digests(path)
    assert all(HEX64.match(d) for d in [digests["model"], digests["client"], *digests["blocks"]])
    assert len(set(digests["blocks"])) == 3
    assert [block_digest(path, i) for i in range(3)] == digests["blocks"]
    assert client_digest(path) == digests["client"] and model_digest(path) == digests["model"]
    assert json.loads((path / DIGEST_FILE).read_text())["blocks"] == digests["blocks"]
    assert compute_digests(make_model(arch="llama", seed=1))["model"] != digests["model"]


def test_digests_do_not_depend_on_sharding_or_directory(make_model, tmp_path: Path) -> None:
    single, sharded = make_model(arch="llama"), make_model(arch="llama", max_shard_size="100KB")
    assert compute_digests(single) == compute_digests(sharded)
    renamed = tmp_path / "some-other-name"
    shutil.copytree(single, renamed)
    info, other = load_model_info(single), load_model_info(renamed)
    assert info.model_id == other.model_id == f"llama-3x64-{info.digest[:12]}"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", info.model_id)


def test_digest_reflects_the_stored_dtype(make_model) -> None:
    assert block_digest(make_model(arch="llama"), 0) != block_digest(make_model(arch="llama", dtype="bfloat16"), 0)


def test_one_byte_changes_only_that_blocks_digest(make_model, copy_model) -> None:
    original = make_model(arch="mistral", kv_heads=2)
    path = copy_model(original)
    before = compute_digests(path)
    flip_byte(path / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    after = compute_digests(path)
    assert after["blocks"][1] != before["blocks"][1]
    assert after["blocks"][0] == before["blocks"][0] and after["blocks"][2] == before["blocks"][2]
    assert after["client"] == before["client"]
    assert after["model"] != before["model"]
    assert model_digest(path, use_cache=False) == after["model"]


def test_one_byte_in_a_sharded_checkpoint(make_model, copy_model) -> None:
    path = copy_model(make_model(arch="llama", max_shard_size="100KB"))
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.self_attn.o_proj.weight"
    before = [block_digest(path, i) for i in range(3)]
    flip_byte(path / weight_map[name], name, offset_in_tensor=1001)
    after = [block_digest(path, i) for i in range(3)]
    assert [a != b for a, b in zip(after, before, strict=False)] == [False, False, True]


def test_block_digest_reads_only_that_block(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_model(arch="llama", max_shard_size="100KB")
    checkpoint._weight_map(path.resolve())
    spy = SafeOpenSpy(monkeypatch)
    block_digest(path, 2)
    assert spy.tensors and all(n.startswith("model.layers.2.") for n in spy.tensors)


def test_stale_digest_file_is_ignored(make_model, copy_model) -> None:
    # Replace the weights by a different model of the same shape (same file size), keeping
    # the old digest file: the model digest must follow the weights, not the file.
    path = copy_model(make_model(arch="llama"))
    other = make_model(arch="llama", seed=1)
    shutil.copyfile(other / "model.safetensors", path / "model.safetensors")
    assert model_digest(path) == compute_digests(other)["model"]
    assert load_model_info(path).model_id == load_model_info(other).model_id


def test_fresh_digest_file_is_used_and_can_be_rewritten(make_model, copy_model, monkeypatch) -> None:
    path = copy_model(make_model(arch="llama"))
    expected = compute_digests(path)["model"]
    calls = []
    monkeypatch.setattr(checkpoint, "compute_digests", lambda p: calls.append(p) or {})
    assert model_digest(path) == expected and calls == []  # answered from the file, no weights read
    monkeypatch.undo()

    (path / DIGEST_FILE).unlink()
    assert model_digest(path) == expected  # recomputed from the weights
    write_digest_file(path)
    assert json.loads((path / DIGEST_FILE).read_text())["blocks"] == compute_digests(path)["blocks"]


@pytest.mark.parametrize("content", ["not json", json.dumps({"version": 99}), json.dumps([1, 2])])
def test_malformed_digest_file_is_ignored(make_model, copy_model, content: str) -> None:
    path = copy_model(make_model(arch="llama"))
    expected = compute_digests(path)["model"]
    (path / DIGEST_FILE).write_text(content)
    assert model_digest(path) == expected


def test_forged_digest_file_does_not_fool_block_digests(make_model, copy_model) -> None:
    # The file is a naming convenience; proofs come from the weights.
    path = copy_model(make_model(arch="llama"))
    record = json.loads((path / DIGEST_FILE).read_text())
    real = record["blocks"][0]
    record["blocks"][0] = "0" * 64
    (path / DIGEST_FILE).write_text(json.dumps(record))
    assert block_digest(path, 0) == real
    assert model_digest(path, use_cache=False) == compute_digests(path)["model"] != model_digest(path)


def test_block_digest_of_a_missing_block(make_model) -> None:
    with pytest.raises(ModelError):
        block_digest(make_model(arch="llama"), 3)
