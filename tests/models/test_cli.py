"""``hivemart model ...`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from hivemart.cli import cli
from hivemart_core.models import DIGEST_FILE, compute_digests, load_model_info

TINY_ARGS = ["--hidden", "64", "--layers", "2", "--heads", "4"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_create_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = run(
        "model",
        "create",
        *TINY_ARGS,
        "--arch",
        "qwen2",
        "--kv-heads",
        "2",
        "--vocab-size",
        "1024",
        "--max-shard-size",
        "100KB",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    info = load_model_info(out)
    assert summary["model_id"] == info.model_id and summary["arch"] == "qwen2"
    assert (summary["num_blocks"], summary["num_kv_heads"], summary["vocab_size"]) == (2, 2, 1024)
    assert (out / "model.safetensors.index.json").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2ForCausalLM"
    assert len(AutoTokenizer.from_pretrained(out)) == 1024


def test_create_matches_the_python_api(tmp_path: Path, make_model) -> None:
    result = run(
        "model",
        "create",
        "--hidden",
        "64",
        "--layers",
        "3",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--arch",
        "mistral",
        str(tmp_path / "m"),
    )
    assert result.exit_code == 0, result.output
    api = make_model(arch="mistral", kv_heads=2)
    for name in ("config.json", "model.safetensors", "tokenizer.json", DIGEST_FILE):
        assert (tmp_path / "m" / name).read_bytes() == (api / name).read_bytes()


def test_bad_arch_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["model", "create", "--arch", "gpt2", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "Invalid value for '--arch'" in result.output and "llama" in result.output
    assert not (tmp_path / "m").exists()


def test_inconsistent_shape_is_reported_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["model", "create", *TINY_ARGS, "--kv-heads", "3", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "key/value heads" in result.output
    assert "Traceback" not in result.output


def test_non_empty_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert run("model", "create", *TINY_ARGS, str(out)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    refused = CliRunner().invoke(cli, ["model", "create", *TINY_ARGS, "--seed", "1", str(out)])
    assert refused.exit_code == 1 and "--force" in refused.output
    assert (out / "model.safetensors").read_bytes() == before
    forced = run("model", "create", *TINY_ARGS, "--seed", "1", "--force", str(out))
    assert forced.exit_code == 0, forced.output
    assert (out / "model.safetensors").read_bytes() != before


def test_info_and_digest(make_model, copy_model) -> None:
    path = copy_model(make_model(arch="llama"))
    info = run("model", "info", "--json", str(path))
    assert info.exit_code == 0 and json.loads(info.stdout)["model_id"] == load_model_info(path).model_id
    text = run("model", "info", str(path))
    assert "model_id" in text.stdout and load_model_info(path).model_id in text.stdout

    digests = compute_digests(path)
    result = run("model", "digest", "--json", str(path))
    assert result.exit_code == 0 and json.loads(result.stdout) == digests

    record = json.loads((path / DIGEST_FILE).read_text())
    record["client"] = "f" * 64  # a file that disagrees with the weights it claims to describe
    (path / DIGEST_FILE).write_text(json.dumps(record))
    disagreeing = CliRunner().invoke(cli, ["model", "digest", str(path)])
    assert disagreeing.exit_code == 1 and "disagrees" in disagreeing.output
    fixed = run("model", "digest", "--write", str(path))
    assert fixed.exit_code == 0
    assert json.loads((path / DIGEST_FILE).read_text())["client"] == digests["client"]


def test_info_of_a_missing_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["model", "info", str(tmp_path)])
    assert result.exit_code == 1 and "no config.json" in result.output
