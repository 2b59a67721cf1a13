"""docs/api.md is generated from the OpenAPI schema (scripts/gen_api_docs.py) and must match it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_api_docs.py"


def load_generator():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_api_docs_match_the_schema() -> None:
    gen = load_generator()
    expected = gen.render(gen.schema())
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == expected, "docs/api.md is out of date: run .venv/bin/python scripts/gen_api_docs.py"


def test_every_endpoint_and_schema_is_documented() -> None:
    gen = load_generator()
    api = gen.schema()
    text = gen.render(api)
    for path, item in api["paths"].items():
        for method in gen.METHODS:
            if method in item:
                assert f"### `{method.upper()} {path}`" in text
    for name in api["components"]["schemas"]:
        assert f"\n### {name}\n" in text
    assert "/api/jobs/" in api["paths"] and "### `POST /api/jobs/`" in text


def test_check_mode_flags_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "api.md"
    stale.write_text("# stale\n")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "-o", str(stale)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1 and "out of date" in run.stderr
    fresh = subprocess.run([sys.executable, str(SCRIPT), "-o", str(stale)], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "-o", str(stale)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
