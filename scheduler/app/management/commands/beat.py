"""``hivemart-market beat [celery beat options]``: the scheduler's periodic-task clock."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Run the scheduler's beat (same as `celery -A scheduler beat`): probes, expiry and matching sweeps. "
        "Run exactly one per deployment."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="options passed to `celery beat`")

    def run_from_argv(self, argv: list[str]) -> None:
        # Celery parses its own options (``--pool solo``); Django's parser would refuse them.
        self.handle(celery_args=argv[2:])

    def handle(self, *args: Any, celery_args: list[str], **options: Any) -> None:
        from scheduler.celery import app, celery_argv

        # Beat keeps its schedule in a file; make its folder (with Redis as the broker nothing
        # else creates $HIVEMART_HOME/celery).
        Path(_schedule_file(celery_args) or app.conf.beat_schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        app.start(celery_argv("beat", celery_args))


def _schedule_file(celery_args: list[str]) -> str | None:
    """The ``-s/--schedule FILE`` (or ``--schedule=FILE``) given to celery beat, if any."""
    for i, arg in enumerate(celery_args):
        if arg.startswith("--schedule="):
            return arg.split("=", 1)[1]
        if arg in ("-s", "--schedule") and i + 1 < len(celery_args):
            return celery_args[i + 1]
    return None
