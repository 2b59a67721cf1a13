"""``hivemart demo``: the whole system on this machine, with nothing to install.

See :mod:`hivemart.demo.scenario` for the phases. Progress goes to stderr when ``--json``
is given, so that stdout carries only the JSON summary as its last line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from hivemart.cli._root import cli, require_server_stack


def _data_dir(path: Path | None) -> Path:
    return Path(path or os.environ.get("HIVEMART_HOME") or Path.cwd() / ".hivemart" / "demo").resolve()


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo keeps its database, model, keys and logs (default: $HIVEMART_HOME or ./.hivemart/demo).",
)
@click.option(
    "--new-tokens",
    default=48,
    show_default=True,
    type=click.IntRange(8, 512),
    help="Tokens the inference job generates.",
)
@click.option(
    "--finetune-steps",
    default=30,
    show_default=True,
    type=click.IntRange(2, 1000),
    help="LoRA steps of the fine-tuning job.",
)
@click.option("--keep", is_flag=True, help="Leave everything running after the summary, until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
def demo(data_dir: Path | None, new_tokens: int, finetune_steps: int, keep: bool, as_json: bool) -> None:
    """Run the marketplace, scheduler, a swarm of providers, a paid inference job with a failover, a LoRA
    fine-tuning job and settlement, all on this machine; then print what happened."""
    require_server_stack("demo", "all")
    from hivemart.demo.scenario import DemoError, DemoOptions, run_demo
    from hivemart_core.errors import HivemartError
    from hivemart_core.logs import adopt_hivemind_logging

    # The in-process client's hivemind lines go through this CLI's handler, which the demo holds
    # back while it streams generated text (hivemart_core.logs.logs_held).
    adopt_hivemind_logging()

    out = sys.stderr if as_json else sys.stdout

    def say(text: str) -> None:
        click.echo(text, file=out)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    def emit_summary(summary: dict) -> None:
        if as_json:
            click.echo(json.dumps(summary))
            sys.stdout.flush()

    options = DemoOptions(
        home=_data_dir(data_dir),
        new_tokens=new_tokens,
        kill_at=max(2, new_tokens // 3),
        finetune_steps=finetune_steps,
        keep=keep,
        say=say,
        write=write,
        emit_summary=emit_summary,
    )
    try:
        summary = run_demo(options)
    except KeyboardInterrupt:
        say("\nstopped: every process the demo started has been stopped")
        sys.exit(130)
    except (DemoError, HivemartError) as e:
        raise click.ClickException(f"{e}\n(logs: {options.home / 'logs'} and {options.home / 'swarm'})") from e
    problems = [name for name in ("failover_ok", "ledger_balanced", "exact_match") if not summary[name]]
    if problems:
        raise click.ClickException(f"the demo finished but these checks failed: {', '.join(problems)}")
