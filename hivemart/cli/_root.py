from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Hivemart: run and fine-tune language models on other people's GPUs."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def initial_peers_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    """``--initial-peers`` as a list of checked multiaddrs (entries may hold several, space-separated)."""
    from hivemart_core.swarm.p2p import check_initial_peers  # imports hivemind: only for the swarm commands

    try:
        return check_initial_peers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
