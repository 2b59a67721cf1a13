"""Paid runs for ``hivemart generate`` and ``hivemart finetune``: a new marketplace job
(``--paid``), or one made earlier with ``hivemart jobs create`` (``--job ID``).

A job's tickets name the client key it was created with, and only that key may countersign
its receipts. ``hivemart jobs create`` therefore generates the key and keeps it beside the CLI's
config (``job-keys/<marketplace>-<id>.key``, mode 0600), where ``--job ID`` finds it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from hivemart.cli._config import config_path, load_config

if TYPE_CHECKING:
    from client_sdk.swarm.job import MarketJob
    from hivemart_core.protocol.identity import Identity

__all__ = [
    "paid_job_options",
    "job_key_path",
    "new_job_identity",
    "open_paid_job",
    "paid_options_check",
    "save_job_identity",
    "ticket_hint",
]


def job_key_path(base_url: str, job_id: int) -> Path:
    """Where the client key of job ``job_id`` on the marketplace at ``base_url`` is kept."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", urlsplit(base_url).netloc) or "market"
    return config_path().parent / "job-keys" / f"{host}-{int(job_id)}.key"


def new_job_identity() -> Identity:
    from hivemart_core.protocol.identity import Identity

    return Identity.generate()


def save_job_identity(identity: Identity, base_url: str, job_id: int) -> Path:
    path = job_key_path(base_url, job_id)
    identity.save(path)
    return path


def paid_job_options(*, what: str, budget: int, job_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of a paid run, the same for ``generate`` and ``finetune``: ``--paid``, ``--job``,
    ``--budget``, ``--max-price`` and ``--url`` (``what`` names the job in ``--paid``'s help)."""
    options = [
        click.option(
            "--paid",
            is_flag=True,
            help=f"Run as a marketplace {what} (uses `hivemart login`'s key): the plan's providers, "
            "tickets, receipts and settlement.",
        ),
        click.option("--job", "job_id", type=click.IntRange(min=1), help=job_help),
        click.option(
            "--budget",
            default=budget,
            show_default=True,
            type=click.IntRange(min=1),
            help="With --paid: micro-credits to hold.",
        ),
        click.option(
            "--max-price",
            default=2_000_000,
            show_default=True,
            type=click.IntRange(min=0),
            help="With --paid: highest price, micro-credits per million work units.",
        ),
        click.option(
            "--url", "base_url", help="With --paid or --job: the marketplace (default: saved, or HIVEMART_URL)."
        ),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def paid_options_check(paid: bool, job_id: int | None) -> None:
    if paid and job_id is not None:
        raise click.UsageError("--paid creates a new job and --job runs an existing one: give one of them")


def open_paid_job(
    model: Any, *, base_url: str | None, budget: int, max_price: int, kind: str, job_id: int | None
) -> MarketJob:
    """A new ``kind`` job holding ``budget`` (``job_id`` None), or the existing job ``job_id``
    opened with its saved client key; attached to ``model``."""
    from client_sdk.swarm.job import MarketJob
    from hivemart_core.api import Client
    from hivemart_core.errors import InsufficientCreditsError

    config = load_config(base_url=base_url)
    if not config.api_key:
        raise click.ClickException(
            "a paid run needs an API key: run `hivemart login` (or `hivemart signup`) or set HIVEMART_API_KEY"
        )
    client = Client(api_key=config.api_key, base_url=config.base_url)
    try:
        if job_id is None:
            job = MarketJob.create(client, model=model.info.model_id, kind=kind, budget=budget, max_price=max_price)
        else:
            job = MarketJob.open(client, job_id, _saved_identity(config.base_url, job_id))
    except InsufficientCreditsError as e:
        client.close()
        raise click.ClickException(
            f"{e}: a paid job holds its --budget ({budget} micro-credits) up front; lower --budget, or get "
            f"credits (`hivemart balance` shows what you have)"
        ) from e
    except BaseException:
        client.close()
        raise
    if job.job.kind != kind:
        job.client.close()
        raise click.ClickException(
            f"job {job.job_id} is a {job.job.kind} job; run it with `hivemart "
            f"{'generate' if job.job.kind == 'inference' else 'finetune'} --job {job.job_id}`"
        )
    job.attach(model)
    return job


def _saved_identity(base_url: str, job_id: int) -> Identity:
    from hivemart_core.errors import ProtocolError
    from hivemart_core.protocol.identity import Identity

    path = job_key_path(base_url, job_id)
    try:
        return Identity.load(path)
    except FileNotFoundError:
        raise click.ClickException(
            f"no client key for job {job_id} at {path}: --job runs jobs made with `hivemart jobs create` "
            f"on this machine; use --paid to create and run a new job"
        ) from None
    except ProtocolError as e:
        raise click.ClickException(str(e)) from e


def ticket_hint(message: str, command: str) -> str:
    """``message``, plus what to do when the providers would serve only paid jobs."""
    if "ticket_required" in message or "paid jobs only" in message:
        return (
            f"{message}\nthese providers sell through a marketplace: run `hivemart {command}` with --paid (after "
            f"`hivemart login`) for a new paid job, or with --job ID for a job made with `hivemart jobs create`"
        )
    return message
