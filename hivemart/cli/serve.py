"""``hivemart serve``: the OpenAI-compatible gateway (``hivemart.serve``) under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from hivemart.cli._root import cli, initial_peers_callback


def _adapters_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``NAME=DIR`` pairs: a name the API can carry and an existing directory (read at start-up)."""
    from hivemart.serve.engine import ADAPTER_NAME

    pairs: list[tuple[str, Path]] = []
    for value in values:
        name, eq, directory = value.partition("=")
        if not eq or not ADAPTER_NAME.fullmatch(name) or not directory:
            raise click.BadParameter(
                f"{value!r}: use NAME=DIR, NAME being 1 to 64 letters, digits, '.', '_' or '-'", param=param
            )
        if name in (n for n, _ in pairs):
            raise click.BadParameter(f"adapter name {name!r} is given twice", param=param)
        if not Path(directory).is_dir():
            raise click.BadParameter(f"{directory!r} is not a directory (a PEFT LoRA adapter's)", param=param)
        pairs.append((name, Path(directory)))
    return pairs


@cli.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    envvar="HIVEMART_SERVE_MODEL",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The model's checkpoint directory (the gateway runs embeddings, head and tokenizer locally).",
)
@click.option(
    "--initial-peers",
    multiple=True,
    envvar="HIVEMART_INITIAL_PEERS",
    required=True,
    callback=initial_peers_callback,
    help="A bootstrap multiaddr of the swarm, /ip4/HOST/tcp/PORT/p2p/PEER_ID (repeatable; "
    "`hivemart demo` and `hivemart-provider` print theirs).",
)
@click.option(
    "--market",
    "market_url",
    envvar="HIVEMART_MARKET_URL",
    help="Run every request as a paid job of its caller's Hivemart API key on this marketplace.",
)
@click.option(
    "--api-key",
    envvar="HIVEMART_GATEWAY_KEY",
    help="Without --market: the one bearer key this gateway accepts (or set HIVEMART_GATEWAY_KEY).",
)
@click.option(
    "--open",
    "open_access",
    is_flag=True,
    help="Without --market: serve anyone who reaches the port, with no key (a private network only).",
)
@click.option("--name", help="The model's name in the API (default: its model id).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    callback=_adapters_callback,
    metavar="NAME=DIR",
    help="Also serve a PEFT LoRA adapter (from `hivemart finetune --out`, or any PEFT LoRA of the model) "
    "as model MODEL:NAME (repeatable).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-concurrent", default=32, show_default=True, type=click.IntRange(1, 1024), help="Requests served at once."
)
@click.option(
    "--budget",
    default=5_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --market: micro-credits each request's job holds until it settles.",
)
@click.option(
    "--max-price",
    default=2_000_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="With --market: highest price, micro-credits per million work units.",
)
def serve(
    model_path: Path,
    initial_peers: list[str],
    market_url: str | None,
    api_key: str | None,
    open_access: bool,
    name: str | None,
    adapters: list[tuple[str, Path]],
    host: str,
    port: int,
    max_concurrent: int,
    budget: int,
    max_price: int,
) -> None:
    """Serve OpenAI's API (/v1/models, /v1/completions, /v1/chat/completions) over the swarm."""
    try:
        import uvicorn

        from hivemart.serve.app import create_app
        from hivemart.serve.engine import MarketPayer, Served
    except ImportError as e:
        raise click.ClickException(f"`hivemart serve` needs {e.name}: pip install 'hivemart[serve]'") from e
    from hivemart_core.errors import HivemartError

    if market_url and (api_key or open_access):
        raise click.UsageError("with --market each caller's own Hivemart API key pays; drop --api-key/--open")
    if not market_url and not api_key and not open_access:
        raise click.UsageError(
            "a free gateway needs --api-key KEY (or HIVEMART_GATEWAY_KEY) that clients send as their bearer "
            "key, or --open to serve anyone who reaches the port"
        )
    if api_key is not None and len(api_key) < 16:
        raise click.UsageError("--api-key must be at least 16 characters (e.g. `openssl rand -hex 24`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        served = Served.load(model_path, initial_peers=initial_peers, name=name)
    except HivemartError as e:
        raise click.ClickException(str(e)) from e
    for adapter_name, directory in adapters:  # a bad adapter stops the gateway before it serves anything
        try:
            served.add_adapter(adapter_name, directory)
        except (HivemartError, ValueError) as e:
            served.model.close()
            raise click.ClickException(f"--adapter {adapter_name}={directory}: {e}") from e
    payer = MarketPayer(market_url, budget=budget, max_price=max_price) if market_url else None
    app = create_app(served, payer=payer, api_key=api_key, max_concurrent=max_concurrent)
    mode = f"paid jobs on {market_url}" if market_url else ("OPEN to anyone" if open_access else "free, key required")
    click.echo(f"serving {', '.join(served.model_names())} ({mode}) at http://{host}:{port}/v1", err=True)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets requests finish (up to the
    # timeout), then the app's shutdown settles open jobs and leaves the swarm.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30, access_log=False)
