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


def test_run_rejects_a_missing_model_directory(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tmp_path / "nope"), "--blocks", "0:1"])
    assert result.exit_code == 2 and "does not exist" in result.output
