from __future__ import annotations

import importlib
import re
from typing import Any

import click

from hivemart_core.errors import APIError, ValidationError
from hivemart_core.logs import LOG_FORMATS, configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v", "--verbose", count=True, help="More log output (-v info, -vv debug with HTTP and hivemind chatter)."
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    envvar="HIVEMART_LOG_FORMAT",
    help="Log lines on stderr: text ('TIME LEVEL logger: message') or json (one object per line).",
)
def cli(verbose: int, log_format: str) -> None:
    """Hivemart: run and fine-tune language models on other people's GPUs."""
    configure_logging(verbose, log_format.lower())


def initial_peers_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    """``--initial-peers`` as a list of checked multiaddrs (entries may hold several, space-separated)."""
    from hivemart_core.logs import adopt_hivemind_logging
    from hivemart_core.swarm.p2p import check_initial_peers  # imports hivemind: only for the swarm commands

    adopt_hivemind_logging()  # hivemind's own log lines in this CLI's format, not hivemind's

    try:
        return check_initial_peers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# What the commands that run the marketplace on this machine (demo, bench ledger/settle/chaos)
# import first; ``pip install hivemart`` (the SDK and CLI) leaves them out.
SERVER_STACK = ("django", "rest_framework", "celery", "psycopg")


def require_server_stack(command: str, extra: str) -> None:
    """Stop ``command`` with one line naming the extra to install when the marketplace's server
    stack is missing, instead of a traceback from deep inside Django's setup."""
    missing = []
    for module in SERVER_STACK:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise click.ClickException(
            f"`hivemart {command}` runs the marketplace on this machine, which needs {', '.join(missing)}: "
            f"pip install 'hivemart[{extra}]'"
        )


def api_error_text(error: APIError) -> str:
    """An API error as the CLI prints it: for a rejected request, each bad field and why
    (``budget: Ensure this value is greater than or equal to 1.``), not "see extra.fields"."""
    fields = error.extra.get("fields") if isinstance(error, ValidationError) else None
    if not isinstance(fields, dict) or not fields:
        return str(error)
    problems = "; ".join(f"{name}: {_field_messages(messages)}" for name, messages in fields.items())
    return f"invalid input: {problems} ({error.code}, HTTP {error.status})"


def _field_messages(messages: Any) -> str:
    if isinstance(messages, list):
        return " ".join(_field_messages(m) for m in messages)
    if isinstance(messages, dict):  # a nested object's fields
        return "; ".join(f"{k}: {_field_messages(v)}" for k, v in messages.items())
    return str(messages)


# What a scheduler's failure reason asks the client to change, and the flag that changes it.
_NEEDED_PRICE = re.compile(r">= (\d+) micro-credits per million units; raise max_price")
_NEEDED_BUDGET = re.compile(r"raise budget to >= (\d+)")


def failure_hint(reason: str) -> str:
    """For a failed job's ``reason``, what to run differently, naming the flag; "" when the
    reason asks for nothing a flag can change."""
    hints = []
    if price := _NEEDED_PRICE.search(reason):
        hints.append(f"create the job again with --max-price {price.group(1)} or more")
    elif "raise max_price" in reason:
        hints.append("create the job again with a higher --max-price")
    if budget := _NEEDED_BUDGET.search(reason):
        hints.append(f"create the job again with --budget {budget.group(1)} or more")
    if "lower min_throughput" in reason:
        hints.append("create the job again with a lower min_throughput (or none)")
    if "no provider offers" in reason:
        hints.append("`hivemart providers list` shows which blocks are served; until one serves them, no job can run")
    return "; ".join(hints)
