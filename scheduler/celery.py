"""The Celery app: ``celery -A scheduler worker`` / ``hivemart-market worker`` (and ``beat``).

Configured from Django settings (``marketplace.settings``):

- ``REDIS_URL`` set (production, CI): Redis is broker and result store.
- unset (``hivemart demo``, a laptop): kombu's *filesystem* transport made safe for
  concurrent processes (:mod:`scheduler.broker`, ``hivemartfs://``), with messages as
  files in ``$HIVEMART_HOME/celery/queue`` and results in ``$HIVEMART_HOME/celery/results``.
  It needs no service and no extra package, and separate processes (web, worker, beat) on
  one machine share it because a message is a file that appears complete (renamed into
  place) and that one consumer claims with an atomic rename before deleting it. The
  SQLAlchemy transport would also work across processes but adds a dependency and contends
  with the marketplace for SQLite's single writer lock. The price: the filesystem transport removes a message when it is fetched, so
  ``acks_late`` does not survive a worker crash there; the beat sweeps (``jobs_match_pending``,
  ``holds_expire``) pick such work up again. Production uses Redis.
"""

from __future__ import annotations

import logging
import logging.config
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init

from scheduler import broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

app = Celery("hivemart", include=["scheduler.tasks"])


def broker_config(*, redis_url: str, home: Path, queue: str) -> dict[str, Any]:
    """Broker, result store and queue for ``redis_url`` (empty: the embedded filesystem broker)."""
    config: dict[str, Any] = {"task_default_queue": queue}
    if redis_url:
        config.update(
            broker_url=redis_url,
            result_backend=redis_url,
            # acks_late tasks are redelivered only after this; longer than any task runs.
            broker_transport_options={"visibility_timeout": 3600},
        )
        return config
    queue_dir = home / "celery" / "queue"
    results_dir = home / "celery" / "results"
    for folder in (queue_dir, results_dir):
        folder.mkdir(parents=True, exist_ok=True)
    control_dir = home / "celery" / "control"
    control_dir.mkdir(parents=True, exist_ok=True)
    config.update(
        broker_url=f"{broker.SCHEME}://",
        broker_transport_options={
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
            "polling_interval": 0.5,
        },
        result_backend=f"file://{results_dir}",
    )
    return config


def beat_schedule(settings: Any) -> dict[str, dict[str, Any]]:
    """Periodic tasks and their intervals (seconds, from settings)."""
    housekeeping = timedelta(seconds=settings.HIVEMART_HOUSEKEEPING_INTERVAL_S)
    return {
        "providers-expire": {"task": "scheduler.providers_expire", "schedule": housekeeping},
        "holds-expire": {"task": "scheduler.holds_expire", "schedule": housekeeping},
        "jobs-match-pending": {"task": "scheduler.jobs_match_pending", "schedule": housekeeping},
        "audits-decide-open": {"task": "scheduler.audits_decide_open", "schedule": housekeeping},
        "idempotency-records-purge": {"task": "scheduler.idempotency_records_purge", "schedule": timedelta(hours=1)},
        "receipts-settle": {
            "task": "scheduler.receipts_settle",
            "schedule": timedelta(seconds=settings.HIVEMART_SETTLE_INTERVAL_S),
        },
        "providers-probe": {
            "task": "scheduler.providers_probe",
            "schedule": timedelta(seconds=settings.HIVEMART_PROBE_INTERVAL_S),
        },
    }


def configure(celery_app: Celery) -> None:
    """Read the Django settings into ``celery_app`` (Django is set up lazily by Celery's fixup)."""
    from django.conf import settings

    celery_app.conf.update(
        **broker_config(
            redis_url=settings.REDIS_URL, home=settings.HIVEMART_HOME, queue=settings.HIVEMART_CELERY_QUEUE
        ),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=timedelta(days=1),
        timezone="UTC",
        enable_utc=True,
        # Defaults for every task; each task still sets its own retries.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(Path(settings.HIVEMART_HOME) / "celery" / "beat-schedule"),
    )


configure(app)


def log_level() -> str:
    """``HIVEMART_LOG_LEVEL`` as the settings read it."""
    from django.conf import settings

    level: str = settings.LOGGING["root"]["level"]
    return level


def celery_argv(command: str, args: list[str]) -> list[str]:
    """argv for ``celery COMMAND ARGS`` (worker, beat): the level of ``HIVEMART_LOG_LEVEL`` unless
    ``args`` say ``--loglevel`` (the last one counts); no banners when the logs are JSON lines,
    which must all parse."""
    from django.conf import settings

    quiet = ["--quiet"] if settings.HIVEMART_LOG_FORMAT == "json" else []
    return [*quiet, command, "--loglevel", log_level(), *args]


@setup_logging.connect
def _log_like_the_web_process(loglevel: Any = None, **kwargs: Any) -> None:
    """Worker and beat log as the web process does (``settings.LOGGING``: one line per record,
    text or JSON by ``HIVEMART_LOG_FORMAT``), not in Celery's own format; ``--loglevel`` (the
    commands pass ``HIVEMART_LOG_LEVEL``) sets the level."""
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@worker_init.connect
def _route_hivemind_logs(**kwargs: Any) -> None:
    """Probes run the swarm client in the worker: its hivemind lines take the same format too."""
    from django.conf import settings

    if settings.HIVEMART_SWARM_PEERS:  # no probes, no hivemind (importing it takes seconds)
        from hivemart_core.logs import adopt_hivemind_logging

        # settings.LOGGING keeps hivemind's per-request INFO out unless the level is DEBUG.
        adopt_hivemind_logging(logging.DEBUG if log_level() == "DEBUG" else logging.WARNING)
