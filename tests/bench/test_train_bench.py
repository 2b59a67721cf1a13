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


def test_training_under_load_reports_each_job_count_and_exact_inference(tiny_model, two_provider_swarm):
    from hivemart.bench.finetune import TrainLoad, measure_train_load

    reports, summary = measure_train_load(
        tiny_model,
        two_provider_swarm.initial_peers,
        jobs=(2,),
        load=TrainLoad(batch_size=2, seq_len=12, steps=1, chunk_tokens=24, rank=2),
        new_tokens=3,
        repeats=1,
    )
    assert [r["jobs"] for r in reports] == [2] and reports[0]["steps"] == 2
    assert reports[0]["steps_per_s"] > 0 and reports[0]["inference_runs"] >= 1
    # Every job finished its steps with finite losses, and the client's tokens under load are
    # the tokens it generates alone: concurrent training changed nothing it computes.
    assert reports[0]["jobs_ok"] is True and reports[0]["inference_exact"] is True
    assert summary["jobs"] == [2] and summary["steps_per_s"] == [reports[0]["steps_per_s"]]
    assert summary["inference_ms_per_token"] == [reports[0]["inference_ms_per_token"]]
    assert summary["inference_slowdown"][0] == pytest.approx(
        reports[0]["inference_ms_per_token"] / summary["inference_ms_per_token_idle"], rel=0.01
    )
    assert summary["inference_exact"] is True and summary["jobs_ok"] is True


@pytest.mark.parametrize(
    ("args", "complaint"),
    [(["--jobs", "2,x"], "--jobs"), (["--jobs", "0,2"], "--jobs"), (["--jobs", "2", "--mode", "ptune"], "--mode")],
)
def test_bench_train_under_load_rejects_bad_options(args, complaint):
    result = CliRunner().invoke(cli, ["bench", "train", *args])
    assert result.exit_code == 2 and complaint in result.output
