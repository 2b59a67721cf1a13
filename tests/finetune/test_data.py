"""Training data: JSONL or plain text, packed rows, a batch order that survives a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from client_sdk.finetune.data import DataError, PackedDataset, load_texts
from client_sdk.finetune.trainer import TrainConfig
from hivemart.cli import cli
from hivemart_core.models import build_tokenizer

# A well-formed bootstrap address that nothing listens on: the CLI must refuse the data first.
BOOTSTRAP = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLUvwcb6NK7NpEvuXiMTjyBZwFsoB6wMAqkGX64yxjwYS"


def test_jsonl_and_plain_text(tmp_path: Path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert load_texts(jsonl) == ["one", "two"]
    plain = tmp_path / "b.txt"
    plain.write_text("first line\n\n  second line\n")
    assert load_texts(plain) == ["first line", "  second line"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no text"),
        ('{"text": "ok"}\n{"text": 3}\n', ":2: expected an object"),
        ('{"text": "ok"}\n{broken\n', ":2: not valid JSON"),
    ],
)
def test_bad_files_say_where(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_texts(path)


def test_rows_are_packed_and_the_order_depends_only_on_seed_and_step():
    tokenizer = build_tokenizer()
    dataset = PackedDataset.from_texts(["hello world"] * 40, tokenizer, 8, seed=3)
    assert dataset.rows.shape[1] == 8 and len(dataset.rows) >= 5
    again = PackedDataset.from_texts(["hello world"] * 40, tokenizer, 8, seed=3)
    for step in (0, 1, 7):
        assert torch.equal(dataset.batch(step, 3), again.batch(step, 3))
    # Every row once per epoch.
    count = len(dataset.rows)
    epoch = torch.cat([dataset.batch(step, 1) for step in range(count)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, dataset.rows.tolist()))
    short = PackedDataset.from_texts(["hi"], tokenizer, 64)
    assert short.rows.shape[0] == 1 and short.rows.shape[1] < 64


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="full")
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))


def test_cli_refuses_a_bad_data_file_before_connecting(tmp_path: Path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"no_text": 1}\n')
    model = tmp_path / "model"
    model.mkdir()
    result = CliRunner().invoke(
        cli, ["finetune", "--model", str(model), "--initial-peers", BOOTSTRAP, "--data", str(data), "--quiet"]
    )
    assert result.exit_code != 0 and ":1: expected an object" in result.output
