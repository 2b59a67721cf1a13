"""``hivemart bench ...``: benchmarks. Each prints one JSON object as its last line with --json.

Implementations live beside the code they measure and are imported only when run, so that
``hivemart`` stays quick to start and the REST-only install needs no Django or torch.
"""

from __future__ import annotations

from client_sdk.cli._root import cli

import click


@cli.group()
def bench() -> None:
    """Measure Hivemart's components (see each subcommand's --help)."""
