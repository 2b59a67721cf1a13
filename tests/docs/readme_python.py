"""The README's Python snippet, and a way to run it as a user would (a fresh interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_snippet() -> str:
    """The python block of the README's "Using the swarm from Python" section."""
    section = (ROOT / "README.md").read_text().split("## Using the swarm from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Python section has no python block"
    return match.group(1)


def run_readme_snippet(
    maddr: str, model: Path | None, cwd: Path = ROOT, market: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the snippet as written; only the environment it documents differs: MADDR, MODEL, and
    for a marketplace's providers ``market`` = (HIVEMART_URL, HIVEMART_API_KEY)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HIVEMART_URL", "HIVEMART_API_KEY")}
    env.update(MADDR=maddr, PYTHONPATH=str(ROOT))
    if market is not None:
        env["HIVEMART_URL"], env["HIVEMART_API_KEY"] = market
    if model is not None:
        env["MODEL"] = str(model)
    return subprocess.run(
        [sys.executable, "-c", readme_snippet()], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
