"""Read every import of the project's packages, those inside functions and ``TYPE_CHECKING``
blocks too, straight from the source (nothing is imported), as a graph between modules."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hivemart_core", "client_sdk", "provider_agent", "marketplace", "scheduler", "hivemart")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "provider_agent.server"
    target: str  # the imported module (a submodule where the name is one), e.g. "hivemart_core.errors"
    line: int

    def __str__(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                modules[_module_name(path)] = path
    return modules


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[Import]:
    """Every module ``module`` imports, third-party ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # ``from pkg import mod`` imports pkg.mod; ``from pkg import name`` imports pkg.
                target = submodule if base.split(".")[0] in PACKAGES and _is_module(submodule) else base
                found.append(Import(module, target, node.lineno))
    return found


def project_imports() -> list[Import]:
    return [imp for module, path in project_modules().items() for imp in imports_of(module, path)]


def top_level(name: str) -> str:
    return name.split(".")[0]
