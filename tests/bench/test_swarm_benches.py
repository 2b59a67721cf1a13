"""The swarm benchmarks run end to end at toy sizes and report what they promise.

These check the benchmarks' plumbing and correctness fields, never their timings.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hivemart.cli import cli

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_bench_inference_reports_an_exact_match(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "inference",
            "--json",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--providers",
            "2",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    report = last_json_line(result.stdout)
    assert set(report) >= {
        "hidden",
        "layers",
        "providers",
        "local_ms_per_token",
        "swarm_ms_per_token",
        "ratio",
        "overhead_ms_per_hop",
        "exact_match",
        "local_fast_ms_per_token",
        "ratio_fast",
        "exact_match_fast",
    }
    assert (report["hidden"], report["layers"], report["providers"]) == (64, 2, 2)
    assert report["exact_match"] is True
    # The fast baseline runs the providers' step code in one process: the swarm's tokens, bit for bit.
    assert report["exact_match_fast"] is True
    assert report["ratio_fast"] == pytest.approx(
        report["swarm_ms_per_token"] / report["local_fast_ms_per_token"], rel=0.01
    )
    assert report["provider_threads"] == 1  # chosen by the agents: hidden-64 blocks are too small to split
    assert report["ratio"] == pytest.approx(report["swarm_ms_per_token"] / report["local_ms_per_token"], rel=0.01)


def test_bench_failover_survives_the_kill_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = CliRunner().invoke(
        cli, ["bench", "failover", "--json", "--hidden", "64", "--layers", "2", "--new-tokens", "12", "--kill-at", "5"]
    )
    assert result.exit_code == 0, result.output
    report = last_json_line(result.stdout)
    assert report["tokens"] == 12 and report["killed_at"] == 5
    assert report["exact_match"] is True and report["failovers"] >= 1
    assert report["max_gap_ms"] >= report["median_ms_per_token"] > 0


def test_bench_failover_rejects_a_kill_outside_the_run():
    result = CliRunner().invoke(cli, ["bench", "failover", "--new-tokens", "10", "--kill-at", "10"])
    assert result.exit_code == 2 and "--kill-at" in result.output


@pytest.mark.parametrize("bench", ["inference", "train"])
def test_benches_reject_a_negative_provider_thread_count(bench):
    result = CliRunner().invoke(cli, ["bench", bench, "--provider-threads", "-2"])
    assert result.exit_code == 2 and "--provider-threads" in result.output
