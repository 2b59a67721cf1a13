"""``hivemart-market beat [celery beat options]``: the scheduler's periodic-task clock."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = ("Run the scheduler's beat (same as `celery -A scheduler beat`): probes, expiry and matching sweeps. "
            "Run exactly one per deployment.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="options passed to `celery beat`")

    def run_from_argv(self, argv: list[str]) -> None:
        # Celery parses its own options (``--pool solo``); Django's parser would refuse them.
        self.handle(celery_args=argv[2:])

    def handle(self, *args: Any, celery_args: list[str], **options: Any) -> None:
        from scheduler.celery import app

        app.start(["beat", "--loglevel", "INFO", *celery_args])
