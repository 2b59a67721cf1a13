"""The layers are a contract: each package imports only the packages below it, and no module
takes part in an import cycle. The rules are read from the source, so an import inside a
function or a ``TYPE_CHECKING`` block counts as much as one at the top of a file.

    hivemart                      the CLI, the demo and the benchmarks
    scheduler                     matching, probing, audits, Celery (above the marketplace)
    client_sdk | provider_agent | marketplace
    hivemart_core                 wire protocol, identities, tickets and receipts, models,
                                  LoRA, the span backend, placement rules, p2p/DHT helpers
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.architecture.imports import PACKAGES, Import, imports_of, project_imports, project_modules, top_level

# What each package may import from the project (itself always).
ALLOWED: dict[str, set[str]] = {
    "hivemart_core": set(),
    "client_sdk": {"hivemart_core"},
    "provider_agent": {"hivemart_core"},
    "marketplace": {"hivemart_core"},
    "scheduler": {"hivemart_core", "marketplace"},
    "hivemart": {"hivemart_core", "client_sdk", "provider_agent", "marketplace", "scheduler"},
}

# What the SDK and provider installs leave out (pyproject's extras): their code must not need it.
SERVER_ONLY = {
    "django",
    "rest_framework",
    "drf_spectacular",
    "celery",
    "kombu",
    "psycopg",
    "gunicorn",
    "whitenoise",
    "dj_database_url",
}
WITHOUT_SERVER_STACK = ("hivemart_core", "client_sdk", "provider_agent")


def test_every_package_is_in_the_contract() -> None:
    assert set(ALLOWED) == set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    breaking = [
        str(imp)
        for imp in project_imports()
        if top_level(imp.source) == package
        and top_level(imp.target) in PACKAGES
        and top_level(imp.target) not in allowed
    ]
    assert breaking == [], f"{package} may import only {sorted(allowed)}"


@pytest.mark.parametrize("package", WITHOUT_SERVER_STACK)
def test_sdk_and_provider_code_needs_no_server_stack(package: str) -> None:
    breaking = [
        str(imp)
        for imp in project_imports()
        if top_level(imp.source) == package and top_level(imp.target) in SERVER_ONLY
    ]
    assert breaking == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _module_graph(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    return edges


def test_no_module_is_in_an_import_cycle() -> None:
    modules = project_modules()
    assert _cycles(_module_graph(project_imports(), set(modules))) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    # The checker itself: two modules importing each other, one of them inside a function.
    edges = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}
    assert _cycles(edges) == [["a.x", "a.y", "a.z"]]


def test_imports_inside_functions_are_read(tmp_path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "def f():\n    from marketplace.ledger import services\n\nif TYPE_CHECKING:\n    import scheduler.tasks\n"
    )
    targets = {imp.target for imp in imports_of("client_sdk.mod", source)}
    assert {"marketplace.ledger.services", "scheduler.tasks"} <= targets
