"""``hivemart bench train`` runs end to end at toy sizes and reports what it promises (never timings)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hivemart.cli import cli

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["lora", "deep_ptune"])
def test_bench_train_reports_matching_gradients(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "train",
            "--json",
            "--mode",
            mode,
            "--hidden",
            "64",
            "--layers",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "20",
            "--repeats",
            "1",
            "--chunk-tokens",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) >= {"mode", "local_s_per_step", "swarm_s_per_step", "ratio", "grad_match"}
    assert report["mode"] == mode and report["grad_match"] is True
    assert report["ratio"] == pytest.approx(report["swarm_s_per_step"] / report["local_s_per_step"], rel=0.05)
