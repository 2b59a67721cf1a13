"""``hivemart generate`` through a real two-provider swarm (free mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from hivemart.cli import cli
from hivemart_core.models import load_tokenizer

pytestmark = [pytest.mark.swarm]


def test_generate_streams_the_tokens_of_local_transformers(tiny_model: Path, two_provider_swarm: LocalSwarm) -> None:
    prompt = "The swarm answers"
    peers = [a for peer in two_provider_swarm.initial_peers for a in ("--initial-peers", peer)]
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["generate", prompt, "--model", str(tiny_model), *peers, "--max-new-tokens", "6", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected = local.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out["text"] == tokenizer.decode(expected[0, ids.shape[1] :]) and out["tokens"] == 6
    assert out["job"] is None

    streamed = runner.invoke(
        cli, ["generate", prompt, "--model", str(tiny_model), *peers, "--max-new-tokens", "6"], catch_exceptions=False
    )
    assert streamed.exit_code == 0 and streamed.output.startswith(prompt) and out["text"] in streamed.output


def test_generate_explains_missing_login_for_paid_jobs(
    tiny_model: Path, two_provider_swarm: LocalSwarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEMART_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.delenv("HIVEMART_API_KEY", raising=False)
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "hi",
            "--model",
            str(tiny_model),
            "--initial-peers",
            two_provider_swarm.initial_peers[0],
            "--paid",
        ],
    )
    assert result.exit_code == 1 and "hivemart login" in result.output


def test_generate_chat_uses_the_models_template(tiny_model: Path, two_provider_swarm: LocalSwarm) -> None:
    peers = [a for peer in two_provider_swarm.initial_peers for a in ("--initial-peers", peer)]
    result = CliRunner().invoke(
        cli,
        ["generate", "Hello", "--chat", "--model", str(tiny_model), *peers, "--max-new-tokens", "5", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<s>assistant\n")
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected = local.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out["text"] == tokenizer.decode(expected[0, ids.shape[1] :])


def test_the_generated_tokenizer_feeds_local_generate(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    encoded = tokenizer(["Hello there"], return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids, which generate() refuses
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    out = local.generate(**encoded, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 2
