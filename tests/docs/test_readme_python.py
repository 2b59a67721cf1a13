"""The README's Python snippet runs as written against a running swarm (``hivemart demo --keep``
runs it against the demo itself: tests/demo/test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_sdk.swarm.local import LocalSwarm
from tests.docs.readme_python import readme_snippet, run_readme_snippet

pytestmark = pytest.mark.swarm


def test_the_snippet_names_the_demo_checkpoint_and_explains_maddr() -> None:
    snippet = readme_snippet()
    assert '".hivemart/demo/models/demo-llama"' in snippet  # where `hivemart demo` creates it (cwd)
    assert 'os.environ["MADDR"]' in snippet and "hivemart demo --keep" in snippet


def test_the_readme_python_snippet_runs_as_written(two_provider_swarm: LocalSwarm, tiny_model: Path) -> None:
    result = run_readme_snippet(two_provider_swarm.initial_peers[0], tiny_model)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gradient norm with respect to the input embeddings:" in result.stdout
    norm = float(result.stdout.rsplit(":", 1)[1])
    assert norm > 0
