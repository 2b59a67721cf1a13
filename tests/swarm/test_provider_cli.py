"""hivemart-provider refuses bad arguments with a message that says what to do."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from provider_agent.cli import cli
from tests.cli_errors import one_error_line, run_cli


def test_run_needs_blocks_or_a_number_of_blocks(tiny_model):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_model)])
    assert result.exit_code == 1
    assert "--blocks START:END" in result.output and "--num-blocks N" in result.output


def test_run_rejects_malformed_and_empty_block_ranges(tiny_model):
    for blocks in ("4", "a:b", "3:3", "4:2"):
        result = CliRunner().invoke(cli, ["run", "--model", str(tiny_model), "--blocks", blocks])
        assert result.exit_code == 2 and "--blocks" in result.output, (blocks, result.output)


def test_run_rejects_a_negative_thread_count(tiny_model):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_model), "--blocks", "0:1", "--torch-threads", "-1"])
    assert result.exit_code == 2 and "--torch-threads" in result.output and ">=0" in result.output


def test_run_rejects_a_missing_model_directory(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tmp_path / "nope"), "--blocks", "0:1"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_agents_pick_their_cpu_threads_from_the_block_size(tiny_model, tmp_path):
    from client_sdk.swarm.local import AgentSpec, LocalSwarm
    from hivemart_core.models import create_model
    from hivemart_core.models.backend import SpanBackend
    from provider_agent.threads import auto_threads, usable_cores

    wide = create_model(tmp_path / "wide", arch="llama", hidden=512, layers=2, seed=0)
    wide_threads = auto_threads(SpanBackend(wide, 0, 1).block_bytes)  # 12.5 MiB a block
    assert wide_threads == min(usable_cores(), 3)
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        small, large, fixed = swarm.start_each(  # side by side: start-up is most of this test's time
            [
                AgentSpec("small", tiny_model, 0, 2, torch_threads=0),
                AgentSpec("large", wide, 0, 2, torch_threads=0),
                AgentSpec("fixed", tiny_model, 2, 4, torch_threads=3),
            ],
        )
        assert small.ready["torch_threads"] == 1  # 0.1 MiB blocks: threads would cost more than they give
        assert large.ready["torch_threads"] == wide_threads
        assert fixed.ready["torch_threads"] == 3  # the operator's choice wins


# --- start-up errors are one line that says what to do (issue 14), run as the user runs them ---


def test_an_unsupported_architecture_is_one_line(tiny_model, tmp_path):
    import json
    import shutil

    model = tmp_path / "gpt2-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, stderr = run_cli(
        "provider_agent", "run", "--model", str(model), "--blocks", "0:2", "--identity", str(tmp_path / "agent.key")
    )
    line = one_error_line(stderr)
    assert code == 1 and "'gpt2'" in line and "supported: llama" in line


def test_cuda_on_a_cpu_only_torch_is_a_usage_error(tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stderr = run_cli(
        "provider_agent",
        "run",
        "--model",
        str(tiny_model),
        "--blocks",
        "0:2",
        "--device",
        "cuda",
        "--identity",
        str(tmp_path / "agent.key"),
    )
    line = one_error_line(stderr)
    assert code == 2 and "--device" in line and "use --device cpu" in line


@pytest.mark.parametrize(
    "peer, says",
    [
        ("garbage", "is not a multiaddr like /ip4/"),
        ("/ip4/127.0.0.1/tcp/31337", "does not end with the peer's id"),
        ("/ip4/127.0.0.1/tcp/31337/p2p/not-a-peer", "is not a multiaddr like /ip4/"),
    ],
)
@pytest.mark.parametrize("command", ["run", "dht"])
def test_malformed_initial_peers_are_usage_errors(tiny_model, tmp_path, command, peer, says):
    args = ["run", "--model", str(tiny_model), "--blocks", "0:2"] if command == "run" else ["dht"]
    code, stderr = run_cli("provider_agent", *args, "--initial-peers", peer, "--identity", str(tmp_path / "k.key"))
    line = one_error_line(stderr)
    assert code == 2 and "--initial-peers" in line and says in line


@pytest.mark.slow
def test_unreachable_initial_peers_are_one_line(tiny_model, tmp_path):
    """A well-formed address where nobody listens: p2pd gives up after its dial timeout."""
    from hivemart_core.protocol.identity import Identity

    nobody = Identity.load_or_create(tmp_path / "nobody.key").peer_id
    code, stderr = run_cli(
        "provider_agent",
        "run",
        "--model",
        str(tiny_model),
        "--blocks",
        "0:2",
        "--initial-peers",
        f"/ip4/127.0.0.1/tcp/9/p2p/{nobody}",
        "--identity",
        str(tmp_path / "agent.key"),
    )
    line = one_error_line(stderr)
    assert code == 1 and "none of the initial peers answered" in line and "is the bootstrap node running" in line
