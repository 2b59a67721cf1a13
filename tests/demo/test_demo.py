"""``hivemart demo`` from an empty data directory on the embedded defaults (SQLite, the
filesystem broker), as a user runs it: its JSON summary and the web site while ``--keep``
holds it open (the ``kept_demo`` fixture then stops it with Ctrl-C and checks that every
process it started is gone)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.demo.conftest import KeptDemo, processes_using
from tests.docs.readme_python import run_readme_snippet

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

SUMMARY_KEYS = {
    "tokens",
    "tokens_per_s",
    "failover_ok",
    "finetune_loss_drop",
    "receipts",
    "client_spent",
    "providers_earned",
    "fees",
    "ledger_balanced",
    "providers_probed",
    "probe_failures",
    "swarm",
    "model",
}


def test_demo_runs_end_to_end_and_keeps_running(kept_demo: KeptDemo) -> None:
    summary = kept_demo.summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["tokens"] == 24 and summary["tokens_per_s"] > 0
    assert summary["failover_ok"] is True and summary["exact_match"] is True
    assert summary["ledger_balanced"] is True
    assert summary["gateway_tokens"] > 0  # one chat completion through `hivemart serve --market`, paid
    assert summary["receipts"] > 0
    assert summary["client_spent"] > 0
    assert summary["client_spent"] == summary["providers_earned"] + summary["fees"]
    assert summary["fees"] == summary["client_spent"] - summary["providers_earned"] >= 0
    assert summary["finetune_loss_drop"] > 0

    page = httpx.get(summary["web"] + "/", timeout=10)
    assert page.status_code == 200 and "Hivemart" in page.text
    assert len(processes_using(kept_demo.home)) >= 6  # web, worker, beat, dht, three agents (and p2p daemons)


def test_demo_probes_its_providers_and_shows_measured_figures(kept_demo: KeptDemo) -> None:
    """The scheduler's probes measured every provider through the swarm, none failed, and the
    pages show the measured figures rather than "Not probed yet"."""
    summary = kept_demo.summary
    assert summary["providers_probed"] == 3 and summary["probe_failures"] == 0
    providers = httpx.get(summary["web"] + "/providers/", timeout=10).text
    pages = sorted(set(re.findall(r'href="(/providers/\d+/)"', providers)))
    assert len(pages) >= 3
    for page in pages:
        detail = httpx.get(summary["web"] + page, timeout=10).text
        assert "Not probed yet" not in detail


def test_demo_output_is_readable_off_a_terminal(kept_demo: KeptDemo) -> None:
    _assert_readable_progress(kept_demo.stderr.read_text())


def _assert_readable_progress(text: str) -> None:
    """Off a terminal (here a file) progress is plain lines, not a bar's carriage returns, and no
    log line (the failover's) lands inside the streamed text: it waits for the end of its line."""
    from hivemart.demo.phases import DEMO_PROMPT

    assert "\r" not in text
    streamed = [line for line in text.splitlines() if line.startswith(DEMO_PROMPT)]
    assert len(streamed) == 1, text[-4000:]
    assert " INFO " not in streamed[0] and " WARNING " not in streamed[0] and "WARN" not in streamed[0], streamed
    assert "hivemart.progress: finetune" in text  # the fine-tuning steps, as log lines


def test_the_readme_python_snippet_runs_against_the_kept_demo(kept_demo: KeptDemo) -> None:
    """The README's Python snippet, as written, run where the kept demo's checkpoint is."""
    summary = kept_demo.summary
    assert Path(summary["model_path"]).resolve() == (kept_demo.home / "models" / "demo-llama").resolve()
    market = (summary["web"], summary["client_api_key"])  # the demo's providers serve paid jobs only
    snippet = run_readme_snippet(summary["initial_peers"][0], None, cwd=kept_demo.home.parent.parent, market=market)
    assert snippet.returncode == 0, snippet.stderr[-4000:]
    assert "gradient norm" in snippet.stdout and "paid job:" in snippet.stdout
