"""``hivemart`` and ``hivemart-market`` answer start-up mistakes with one line that says what to
do, never a traceback (issue 14); each runs as a subprocess, as the user runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hivemart_core.errors import NoProvidersError
from tests.cli_errors import one_error_line, run_cli

PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWE9wTYWDGDJct2u3txqD4Sm4b5Uy2bKwfaKSczr9vnVgj"


def test_a_model_without_a_tokenizer_is_one_line(tiny_model: Path, tmp_path: Path):
    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, model)
    for path in model.glob("*token*"):
        path.unlink()
    code, stderr = run_cli("hivemart", "generate", "hello", "--model", str(model), "--initial-peers", PEER)
    line = one_error_line(stderr)
    assert code == 1 and "has no tokenizer" in line and "copy the tokenizer files" in line


@pytest.mark.parametrize("command", ["generate", "finetune"])
def test_malformed_initial_peers_are_usage_errors(tiny_model: Path, tmp_path: Path, command: str):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    extra = ["hello"] if command == "generate" else ["--data", str(data)]
    code, stderr = run_cli(
        "hivemart", command, *extra, "--model", str(tiny_model), "--initial-peers", "localhost:31337"
    )
    line = one_error_line(stderr)
    assert code == 2 and "--initial-peers" in line and "is not a multiaddr like /ip4/" in line


@pytest.mark.parametrize("command", ["migrate", "worker", "verify_ledger"])
def test_market_commands_without_secret_key_say_to_set_it(tmp_path: Path, command: str):
    code, stderr = run_cli(
        "marketplace.manage",
        command,
        env={
            "SECRET_KEY": "",
            "DEBUG": "",
            "DJANGO_SETTINGS_MODULE": "marketplace.settings",
            "HIVEMART_HOME": str(tmp_path),
        },
    )
    line = one_error_line(stderr)
    assert code == 2 and "set SECRET_KEY" in line


def test_the_no_provider_hint_asks_for_a_directory_not_a_model_id():
    message = str(NoProvidersError("llama-6x256-572386d874dc", 3, 6))
    assert "--model DIR --blocks 3:6" in message and "checkpoint directory of llama-6x256-572386d874dc" in message
    assert "--model llama-" not in message
