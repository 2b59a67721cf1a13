"""``hivemart model ...``: create and inspect checkpoints."""

from __future__ import annotations

import click

from client_sdk.cli._root import cli


@cli.group()
def model() -> None:
    """Create and inspect model checkpoints."""
