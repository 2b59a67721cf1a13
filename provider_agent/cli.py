"""``hivemart-provider``: serve blocks of a model (``run``) or a bootstrap DHT node (``dht``).

Every flag can also come from a ``HIVEMART_*`` environment variable (``--model`` from
``HIVEMART_MODEL``, ``--initial-peers`` from ``HIVEMART_INITIAL_PEERS``, space-separated).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from hivemart_core.logs import LOG_FORMATS, configure_logging
from hivemart_core.protocol.identity import is_valid_public_key
from hivemart_core.protocol.tickets import HEX64_PATTERN as HEX64
from provider_agent.config import AgentConfig
from provider_agent.threads import limit_openmp_spinning

__all__ = ["main"]


def _parse_blocks(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start_text, end_text = value.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise click.BadParameter("use START:END, e.g. 0:4 for blocks 0, 1, 2 and 3") from None
    if not 0 <= start < end:
        raise click.BadParameter(f"{value} is an empty or negative range")
    return start, end


def _parse_platform_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not HEX64.match(value) or not is_valid_public_key(bytes.fromhex(value)):
        raise click.BadParameter(
            "the platform key is 64 hex characters of a usable Ed25519 public key (GET /api/platform/ shows it)"
        )
    return value


def _parse_peers(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    from hivemart_core.swarm.p2p import check_initial_peers

    try:
        return check_initial_peers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "it is a CPU-only build" if torch.version.cuda is None else "it sees no GPU"
            raise click.BadParameter(
                f"this torch cannot use {value} ({why}): use --device cpu, or install a CUDA "
                f"build of torch on a machine with an NVIDIA GPU"
            ) from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(
                f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            ) from None
    elif device.type != "cpu":
        raise click.BadParameter(f"{value}: the agent serves on cpu or cuda[:N]") from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "HIVEMART"})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More log output: -v info of every Hivemart component, -vv debug (with HTTP and hivemind chatter). "
    "Without it: start-up steps, state changes, warnings and errors.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    help="text: one 'TIME LEVEL logger: message' line per record; json: one JSON object per line "
    "(env HIVEMART_LOG_FORMAT).",
)
def cli(verbose: int, log_format: str) -> None:
    """Hivemart provider agent: sell your GPU by serving transformer blocks."""
    # The agent's own start-up steps and state changes show at the default level: an operator
    # watching a provider load wants to see what it is doing.
    configure_logging(verbose, log_format.lower(), info_loggers=("provider_agent",))


@cli.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="HIVEMART_MODEL",
    help="Checkpoint directory of the model to serve.",
)
@click.option("--blocks", callback=_parse_blocks, help="Blocks to serve, START:END (half-open).")
@click.option(
    "--num-blocks",
    type=click.IntRange(min=1),
    help="Without --blocks: serve this many blocks where the swarm needs them most.",
)
@click.option(
    "--rebalance-period",
    default=0.0,
    show_default=True,
    help="Without --blocks: seconds between checks whether to move to a weaker part of the swarm (0: never move).",
)
@click.option(
    "--market",
    "market_url",
    envvar="HIVEMART_MARKET",
    help="Marketplace URL: sell through it (its platform key checks tickets; with --api-key, register, "
    "heartbeat, upload receipts); without --blocks, also ask it where this agent is needed.",
)
@click.option(
    "--api-key",
    envvar="HIVEMART_API_KEY",
    help="Marketplace API key: register this provider, heartbeat, upload receipts.",
)
@click.option(
    "--platform-key",
    callback=_parse_platform_key,
    envvar="HIVEMART_PLATFORM_KEY",
    help="Hex public key of the marketplace that signs job tickets (default: fetched from --market). "
    "With either, billable requests need a valid ticket; with neither the agent serves for free.",
)
@click.option(
    "--price",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Price offered to the marketplace: micro-credits per million work units.",
)
@click.option(
    "--receipt-every",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Send a signed receipt on an inference stream every this many steps.",
)
@click.option(
    "--heartbeat-period",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between heartbeats to the marketplace.",
)
@click.option(
    "--upload-period",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between uploads of receipts to the marketplace.",
)
@click.option(
    "--drain-timeout",
    default=60.0,
    show_default=True,
    help="Seconds open sessions may finish before a move; their clients fail over after that.",
)
@click.option(
    "--initial-peers",
    multiple=True,
    envvar="HIVEMART_INITIAL_PEERS",
    callback=_parse_peers,
    help="Multiaddr of a peer in the swarm, ending with its /p2p/ id (repeatable).",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file of this provider (created when missing).",
)
@click.option(
    "--host-maddrs",
    multiple=True,
    default=("/ip4/127.0.0.1/tcp/0",),
    show_default=True,
    help="Multiaddrs to listen on.",
)
@click.option("--announce-maddrs", multiple=True, help="Multiaddrs to announce instead of the listening ones.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=_parse_device,
    help="torch device: cpu, cuda, cuda:1, ..., or auto (cuda when torch sees a GPU, else cpu)",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    help="Compute dtype (auto: the checkpoint's on CPU, float16 on CUDA).",
)
@click.option(
    "--torch-threads",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Threads for torch on CPU (0: automatic, one per 4 MiB of a block's weights, at most one per core).",
)
@click.option("--max-session-length", default=2048, show_default=True, help="Longest inference session, tokens.")
@click.option("--max-sessions", default=64, show_default=True, help="Inference sessions open at once.")
@click.option("--cache-mb", default=512, show_default=True, help="KV cache memory for all sessions, MiB.")
@click.option(
    "--batching/--no-batching",
    default=True,
    show_default=True,
    help="Run the decode steps of concurrent inference sessions as one batched forward.",
)
@click.option(
    "--batch-max-sessions",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most sessions whose decode steps one batched forward runs.",
)
@click.option(
    "--batch-window-ms",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, max=100),
    help="Longest a decode step waits for other active sessions' steps to join its forward "
    "(a lone session never waits).",
)
@click.option(
    "--max-sessions-per-peer",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Inference sessions one peer may hold at once.",
)
@click.option(
    "--peer-cache-mb",
    type=click.FloatRange(min=0),
    help="KV cache one peer's sessions may reserve, MiB (default: a quarter of --cache-mb).",
)
@click.option(
    "--max-streams-per-peer",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Streams one peer may keep open at once; more are refused.",
)
@click.option(
    "--peer-buffer-mb",
    default=1024.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Request tensors one peer may have in flight (received, not yet answered), MiB.",
)
@click.option(
    "--buffer-mb",
    default=4096.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Request tensors all peers together may have in flight, MiB.",
)
@click.option(
    "--session-idle-timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds an inference session may go without a step before it is closed and its cache freed.",
)
@click.option(
    "--stream-idle-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a new stream may wait before its first message, and a message may pause, "
    "before the stream is closed.",
)
@click.option(
    "--adapter-mb",
    default=256.0,
    show_default=True,
    help="Memory for the LoRA adapters of fine-tuning jobs, all together, MiB.",
)
@click.option("--max-adapter-rank", default=64, show_default=True, help="Largest LoRA rank a job may ask for.")
@click.option("--adapter-ttl", default=600.0, show_default=True, help="Seconds an unused adapter is kept.")
@click.option(
    "--graph-mb",
    default=512.0,
    show_default=True,
    help="Activations training forwards may keep for their backwards (saves recomputing), MiB.",
)
@click.option(
    "--graph-ttl",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a training forward's activations are kept waiting for its backward.",
)
@click.option("--throughput", type=float, help="Announce this throughput instead of measuring it (tokens/s/block).")
@click.option(
    "--announce-period",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=60.0),
    help="Seconds between DHT announcements (records live three periods; clients refuse longer than 300 s).",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the ready line (peer id, addresses) to this file instead of stdout.",
)
def run(
    model_path: Path,
    blocks: tuple[int, int] | None,
    num_blocks: int | None,
    rebalance_period: float,
    market_url: str | None,
    api_key: str | None,
    platform_key: str | None,
    price: int,
    receipt_every: int,
    heartbeat_period: float,
    upload_period: float,
    drain_timeout: float,
    initial_peers: list[str],
    identity_path: Path | None,
    host_maddrs: tuple[str, ...],
    announce_maddrs: tuple[str, ...],
    device: str,
    dtype: str,
    torch_threads: int,
    max_session_length: int,
    max_sessions: int,
    cache_mb: int,
    batching: bool,
    batch_max_sessions: int,
    batch_window_ms: float,
    max_sessions_per_peer: int,
    peer_cache_mb: float | None,
    max_streams_per_peer: int,
    peer_buffer_mb: float,
    buffer_mb: float,
    session_idle_timeout: float,
    stream_idle_timeout: float,
    adapter_mb: float,
    max_adapter_rank: int,
    adapter_ttl: float,
    graph_mb: float,
    graph_ttl: float,
    throughput: float | None,
    announce_period: float,
    ready_file: Path | None,
) -> None:
    """Serve blocks of a model to the swarm until interrupted."""
    from hivemart_core.errors import HivemartError
    from hivemart_core.logs import adopt_hivemind_logging

    adopt_hivemind_logging()  # hivemind's lines in the agent's format (here: `--help` need not import it)
    from provider_agent.agent import serve_forever

    config = AgentConfig(
        model_path=model_path,
        blocks=blocks,
        num_blocks=num_blocks,
        rebalance_period=rebalance_period,
        drain_timeout=drain_timeout,
        market_url=market_url,
        api_key=api_key,
        platform_key=platform_key,
        price=price,
        receipt_every=receipt_every,
        heartbeat_period=heartbeat_period,
        upload_period=upload_period,
        initial_peers=initial_peers,
        identity_path=identity_path,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs),
        device=device,
        dtype=dtype,
        torch_threads=torch_threads,
        max_session_length=max_session_length,
        max_sessions=max_sessions,
        cache_bytes=cache_mb * 1024 * 1024,
        batching=batching,
        batch_max_sessions=batch_max_sessions,
        batch_window=batch_window_ms / 1000,
        max_sessions_per_peer=max_sessions_per_peer,
        peer_cache_bytes=None if peer_cache_mb is None else int(peer_cache_mb * 1024 * 1024),
        max_streams_per_peer=max_streams_per_peer,
        peer_buffer_bytes=int(peer_buffer_mb * 1024 * 1024),
        buffer_bytes=int(buffer_mb * 1024 * 1024),
        stream_idle_timeout=stream_idle_timeout,
        session_idle_timeout=session_idle_timeout,
        adapter_bytes=int(adapter_mb * 1024 * 1024),
        max_adapter_rank=max_adapter_rank,
        adapter_ttl=adapter_ttl,
        graph_bytes=int(graph_mb * 1024 * 1024),
        graph_ttl=graph_ttl,
        throughput=throughput,
        announce_period=announce_period,
        announce_ttl=max(3 * announce_period, 5.0),
        ready_file=ready_file,
    )
    from provider_agent.identity_lock import IdentityInUseError

    try:
        serve_forever(config)
    except (
        HivemartError,
        ValueError,
        FileNotFoundError,
        IdentityInUseError,
    ) as e:  # a bad model, unreachable peers, ...
        raise click.ClickException(str(e)) from e


@cli.command()
@click.option(
    "--host-maddrs",
    multiple=True,
    default=("/ip4/127.0.0.1/tcp/0",),
    show_default=True,
    help="Multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/31337.",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file, so the node keeps its peer id across restarts.",
)
@click.option(
    "--initial-peers",
    multiple=True,
    callback=_parse_peers,
    help="Other bootstrap nodes to join (multiaddrs ending with /p2p/ ids).",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the ready line (peer id, addresses) to this file instead of stdout.",
)
def dht(
    host_maddrs: tuple[str, ...], identity_path: Path | None, initial_peers: list[str], ready_file: Path | None
) -> None:
    """Run a bootstrap DHT node: the swarm's well-known entry point."""
    from hivemart_core.logs import adopt_hivemind_logging

    adopt_hivemind_logging()
    from provider_agent.bootstrap import run_bootstrap
    from provider_agent.signals import install_stop_signals

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop)
        await run_bootstrap(
            host_maddrs=list(host_maddrs),
            identity_path=identity_path,
            initial_peers=list(initial_peers),
            ready_file=ready_file,
            stop=stop,
        )

    from hivemart_core.errors import HivemartError
    from provider_agent.identity_lock import IdentityInUseError

    try:
        asyncio.run(main())
    except (HivemartError, IdentityInUseError) as e:  # unreachable initial peers, a port in use, a key in use
        raise click.ClickException(str(e)) from e


def main() -> None:
    """Console-script entry point for ``hivemart-provider``."""
    limit_openmp_spinning()  # before anything loads torch (and with it libgomp)
    configure_logging(0)  # until the group's options say otherwise (usage errors are printed by click)
    cli(prog_name="hivemart-provider")


if __name__ == "__main__":
    main()
