"""``hivemart-market worker [celery worker options]``: the scheduler's Celery worker."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Run a scheduler worker (same as `celery -A scheduler worker`); options after the command go to "
        "Celery, e.g. `hivemart-market worker --concurrency 2 --loglevel INFO`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="options passed to `celery worker`")

    def run_from_argv(self, argv: list[str]) -> None:
        # Celery parses its own options (``--pool solo``); Django's parser would refuse them.
        self.handle(celery_args=argv[2:])

    def handle(self, *args: Any, celery_args: list[str], **options: Any) -> None:
        from scheduler.celery import app, celery_argv

        app.worker_main(celery_argv("worker", celery_args))
