"""``hivemart bench load`` runs end to end at toy sizes: one line per client count, then the
summary, every session exact, batching on and off both measured. Never its timings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hivemart.bench.load import percentile
from hivemart.cli import cli

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def test_bench_load_reports_each_client_count_then_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    args = ["bench", "load", "--json", "--hidden", "64", "--layers", "2", "--providers", "2"]
    result = CliRunner().invoke(cli, [*args, "--clients", "1,3", "--new-tokens", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["clients"] for line in lines[:-1]] == [1, 3]
    for line in lines[:-1]:
        assert line["exact_match"] is True
        assert line["tokens_per_s"] > 0 and line["tokens_per_s_unbatched"] > 0
        assert 0 < line["p50_ms"] <= line["p99_ms"]
    summary = lines[-1]
    assert {k: summary[k] for k in ("hidden", "layers", "providers", "clients")} == {
        "hidden": 64,
        "layers": 2,
        "providers": 2,
        "clients": [1, 3],
    }
    for key in ("tokens_per_s", "tokens_per_s_unbatched", "p50_ms", "p99_ms"):
        assert summary[key] == [line[key] for line in lines[:-1]]
    assert summary["exact_match"] is True


def test_bench_load_refuses_bad_client_counts():
    for bad in ("0", "1,x", ""):
        result = CliRunner().invoke(cli, ["bench", "load", "--clients", bad])
        assert result.exit_code != 0 and "--clients" in result.output


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
