"""The ``hivemart`` command line. Each subcommand group lives in its own module here."""

from __future__ import annotations

# Importing the modules registers their commands on ``cli``.
from hivemart.cli import bench as _bench  # noqa: F401,E402
from hivemart.cli import demo as _demo  # noqa: F401,E402
from hivemart.cli import finetune as _finetune  # noqa: F401,E402
from hivemart.cli import generate as _generate  # noqa: F401,E402
from hivemart.cli import market as _market  # noqa: F401,E402
from hivemart.cli import model as _model  # noqa: F401,E402
from hivemart.cli import money as _money  # noqa: F401,E402
from hivemart.cli import serve as _serve  # noqa: F401,E402
from hivemart.cli._root import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point for ``hivemart``."""
    cli(prog_name="hivemart")
