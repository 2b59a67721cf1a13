"""The docs name files and modules of the repository; each one named must exist, so that a move
(the layers moved many) cannot leave a guide pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hivemart_core", "client_sdk", "provider_agent", "marketplace", "scheduler", "hivemart")
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *(ROOT / p / "README.md" for p in PACKAGES)])
# `provider_agent/metering.py`, `scheduler/app/`, `hivemart_core.protocol.rpc`, in backticks
_PATH = re.compile(r"`((?:" + "|".join(PACKAGES) + r")/[\w/.-]*)`")
# Dotted names of ``hivemart.`` and ``scheduler.`` are mostly RPC names (``hivemart.v2.info``), Celery
# task names (``scheduler.job_match``) and files (``hivemart.env``): only the other packages' are checked.
_MODULE = re.compile(r"`((?:hivemart_core|client_sdk|provider_agent|marketplace)(?:\.\w+)+)`")


def _named_paths(text: str) -> set[str]:
    return set(_PATH.findall(text))


def _named_modules(text: str) -> set[str]:
    return set(_MODULE.findall(text))


def _module_file(parts: list[str]) -> Path | None:
    path = ROOT.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defined_names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: node for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def _module_exists(name: str) -> bool:
    """``pkg.mod``, ``pkg.mod.name`` or ``pkg.mod.Class.member``, read from the source."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        source = _module_file(parts[:end])
        if source is None:
            continue
        rest = parts[end:]
        if not rest:
            return True
        if len(rest) > 2:
            return False
        scope = _defined_names(ast.parse(source.read_text()).body)
        node = scope.get(rest[0])
        if node is None:
            return False
        return len(rest) == 1 or not isinstance(node, ast.ClassDef) or rest[1] in _defined_names(node.body)
    return False


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_and_module_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted(p for p in _named_paths(text) if not (ROOT / p.rstrip("/")).exists())
    missing += sorted(m for m in _named_modules(text) if not _module_exists(m))
    assert missing == [], f"{doc.relative_to(ROOT)} names what does not exist"


def test_the_check_sees_a_stale_name() -> None:
    text = "see `client_sdk/protocol/framing.py` and `provider_agent.backend.SpanBackend`"
    assert _named_paths(text) == {"client_sdk/protocol/framing.py"}
    assert not (ROOT / "client_sdk/protocol/framing.py").exists()
    assert _named_modules(text) == {"provider_agent.backend.SpanBackend"}
    assert not _module_exists("provider_agent.backend.SpanBackend")
