"""hivemart-provider refuses bad arguments with a message that says what to do."""

from __future__ import annotations

from click.testing import CliRunner

from provider_agent.cli import cli


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
    from client_sdk.models import create_model
    from client_sdk.swarm.local import LocalSwarm
    from provider_agent.backend import SpanBackend
    from provider_agent.threads import auto_threads, usable_cores

    wide = create_model(tmp_path / "wide", arch="llama", hidden=512, layers=2, seed=0)
    wide_threads = auto_threads(SpanBackend(wide, 0, 1).block_bytes)  # 12.5 MiB a block
    assert wide_threads == min(usable_cores(), 3)
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        small, large, fixed = swarm.start_agents(tiny_model, [(0, 2)], torch_threads=0) + \
            swarm.start_agents(wide, [(0, 2)], torch_threads=0) + swarm.start_agents(tiny_model, [(2, 4)], torch_threads=3)
        assert small.ready["torch_threads"] == 1  # 0.1 MiB blocks: threads would cost more than they give
        assert large.ready["torch_threads"] == wide_threads
        assert fixed.ready["torch_threads"] == 3  # the operator's choice wins
