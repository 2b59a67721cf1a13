"""``hivemart bench ...``: benchmarks. Each prints one JSON object as its last line with --json.

Implementations live beside the code they measure and are imported only when run, so that
``hivemart`` stays quick to start and the REST-only install needs no Django or torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from hivemart.cli._root import cli, require_server_stack


@cli.group()
def bench() -> None:
    """Measure Hivemart's components (see each subcommand's --help)."""


def emit(result: dict, as_json: bool) -> None:
    """Print a benchmark's result: one JSON object as the last line with --json."""
    import json

    if as_json:
        click.echo(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            click.echo(f"{key:<{width}}  {value}")


@bench.command()
@click.option("--hidden", default=512, show_default=True, help="Hidden size of the generated llama model.")
@click.option("--layers", default=8, show_default=True, help="Transformer blocks.")
@click.option("--providers", default=2, show_default=True, help="Providers the blocks are split across.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens generated per run.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs; the median is reported.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (providers and local model).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option(
    "--provider-threads",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="torch threads per provider (0: the agent's automatic choice from the block size).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def inference(
    hidden: int,
    layers: int,
    providers: int,
    new_tokens: int,
    repeats: int,
    device: str,
    dtype: str,
    provider_threads: int,
    as_json: bool,
) -> None:
    """Local transformers generation versus generation through providers on loopback."""
    from hivemart.bench.inference import run_inference_bench

    result = run_inference_bench(
        hidden=hidden,
        layers=layers,
        providers=providers,
        new_tokens=new_tokens,
        repeats=repeats,
        device=device,
        dtype=dtype,
        provider_threads=provider_threads,
        progress=lambda msg: click.echo(msg, err=True),
    )
    emit(result, as_json)


@bench.command("serve")
@click.option("--hidden", default=256, show_default=True, help="Hidden size of the generated llama model.")
@click.option("--layers", default=4, show_default=True, help="Transformer blocks.")
@click.option("--providers", default=2, show_default=True, help="Providers the blocks are split across.")
@click.option("--new-tokens", default=32, show_default=True, help="Tokens generated per stream.")
@click.option(
    "--streams",
    "concurrency",
    default=(1, 8),
    multiple=True,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Concurrent streams (repeatable).",
)
@click.option("--repeats", default=3, show_default=True, help="Timed rounds; medians are reported.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per concurrency, one per line.")
def serve_bench(
    hidden: int, layers: int, providers: int, new_tokens: int, concurrency: tuple[int, ...], repeats: int, as_json: bool
) -> None:
    """Time to first token and tokens/s through the OpenAI-compatible gateway versus the SDK."""
    from hivemart.bench.serve import run_serve_bench

    lines = run_serve_bench(
        hidden=hidden,
        layers=layers,
        providers=providers,
        new_tokens=new_tokens,
        concurrency=tuple(concurrency),
        repeats=repeats,
        progress=lambda msg: click.echo(msg, err=True),
    )
    for line in lines:
        emit(line, as_json)


@bench.command()
@click.option("--captures", default=10_000, show_default=True, type=click.IntRange(min=1), help="Hold captures in all.")
@click.option(
    "--workers",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Concurrent worker processes, each with its own database session.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def ledger(captures: int, workers: int, as_json: bool) -> None:
    """Concurrent hold captures against the configured database (DATABASE_URL; migrated first)."""
    require_server_stack("bench ledger", "market")
    from hivemart.bench.ledger import run_ledger_bench

    with _database_errors():
        result = run_ledger_bench(captures=captures, workers=workers, progress=lambda msg: click.echo(msg, err=True))
    emit(result, as_json)


@bench.command()
@click.option(
    "--receipts",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Receipts uploaded and settled, one (ticket, session) each.",
)
@click.option("--jobs", default=200, show_default=True, type=click.IntRange(min=1), help="Jobs they spread over.")
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Processes uploading and settling at once, each with its own database session.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def settle(receipts: int, jobs: int, workers: int, as_json: bool) -> None:
    """Receipt uploads (signature checks included) and settlement on the configured database
    (DATABASE_URL; migrated first)."""
    require_server_stack("bench settle", "market")
    from hivemart.bench.receipts import run_settle_bench

    with _database_errors():
        result = run_settle_bench(
            receipts=receipts, jobs=jobs, workers=workers, progress=lambda msg: click.echo(msg, err=True)
        )
    emit(result, as_json)


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """A database that cannot be reached is the operator's to fix: say so in one line."""
    from django.db.utils import OperationalError

    try:
        yield
    except OperationalError as e:
        raise click.ClickException(
            f"cannot use the database at DATABASE_URL: {str(e).strip()}\n"
            f"Create it (for PostgreSQL: createdb NAME) or point DATABASE_URL elsewhere; "
            f"unset, the benchmark uses SQLite under $HIVEMART_HOME."
        ) from e


@bench.command()
@click.option("--hidden", default=512, show_default=True, help="Hidden size of the generated llama model.")
@click.option("--layers", default=8, show_default=True, help="Transformer blocks.")
@click.option("--new-tokens", default=100, show_default=True, help="Tokens generated.")
@click.option("--kill-at", default=20, show_default=True, help="SIGKILL the serving provider after this token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def failover(hidden: int, layers: int, new_tokens: int, kill_at: int, as_json: bool) -> None:
    """Generation through a chain with a backup while its provider is SIGKILLed midway."""
    from hivemart.bench.inference import run_failover_bench

    if not 0 < kill_at < new_tokens:
        raise click.BadParameter("must be between 1 and --new-tokens - 1", param_hint="--kill-at")
    result = run_failover_bench(
        hidden=hidden,
        layers=layers,
        new_tokens=new_tokens,
        kill_at=kill_at,
        progress=lambda msg: click.echo(msg, err=True),
    )
    emit(result, as_json)


def _client_counts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected counts of at least 1 separated by commas (1,4,16), got {value!r}")
    return counts


@bench.command()
@click.option("--hidden", default=512, show_default=True, help="Hidden size of the generated llama model.")
@click.option("--layers", default=8, show_default=True, help="Transformer blocks.")
@click.option("--providers", default=2, show_default=True, help="Providers the blocks are split between.")
@click.option(
    "--clients",
    default="1,4,16,64",
    show_default=True,
    callback=_client_counts,
    help="Client counts to measure, separated by commas; each count's sessions generate at once.",
)
@click.option(
    "--new-tokens", default=64, show_default=True, type=click.IntRange(min=2), help="Tokens each session generates."
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (providers and local model).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option(
    "--provider-threads",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="torch threads per provider (0: the agent's automatic choice from the block size).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per client count, then the summary.")
def load(
    hidden: int,
    layers: int,
    providers: int,
    clients: list[int],
    new_tokens: int,
    device: str,
    dtype: str,
    provider_threads: int,
    as_json: bool,
) -> None:
    """Many sessions generating at once through the same providers, with batching on and off:
    aggregate tokens/s, p50/p99 per-token latency and exactness against local generation."""
    from hivemart.bench.load import run_load_bench

    lines: list[dict] = []
    result = run_load_bench(
        hidden=hidden,
        layers=layers,
        providers=providers,
        clients=clients,
        new_tokens=new_tokens,
        device=device,
        dtype=dtype,
        provider_threads=provider_threads,
        progress=lambda msg: click.echo(msg, err=True),
        emit=lines.append,
    )
    for line in lines:
        emit(line, as_json)
        if not as_json:
            click.echo()
    emit(result, as_json)


@bench.command()
@click.option(
    "--providers", default=10_000, show_default=True, type=click.IntRange(min=1), help="Offers in the random swarm."
)
@click.option("--blocks", default=80, show_default=True, type=click.IntRange(1, 1000), help="Blocks of the model.")
@click.option(
    "--repeats",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed matches; the median is reported.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random swarm.")
@click.option(
    "--kind",
    default="inference",
    show_default=True,
    type=click.Choice(["inference", "finetune"]),
    help="The job's kind, which picks the objective.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def matching(providers: int, blocks: int, repeats: int, seed: int, kind: str, as_json: bool) -> None:
    """Time to match one job (scheduler.matching) against a random swarm of offers."""
    from hivemart.bench.matching import run_matching_bench

    result = run_matching_bench(
        providers=providers,
        blocks=blocks,
        repeats=repeats,
        seed=seed,
        kind=kind,
        progress=lambda msg: click.echo(msg, err=True),
    )
    emit(result, as_json)


def _positive_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """A comma-separated list of positive integers (``2,4``), or None when not given."""
    if value is None:
        return None
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected positive integers separated by commas, like 2,4; got {value!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"every count must be at least 1; got {value!r}")
    return counts


@bench.command("swarm-sim")
@click.option(
    "--providers", default=10_000, show_default=True, type=click.IntRange(min=1), help="Providers in the trace."
)
@click.option(
    "--blocks", default=80, show_default=True, type=click.IntRange(min=1, max=1000), help="The model's blocks."
)
@click.option("--hours", default=24, show_default=True, type=click.IntRange(min=1), help="Simulated hours.")
@click.option("--seed", default=0, show_default=True, help="Seed of the trace (churn, GPUs, checks, jobs).")
@click.option(
    "--checks-per-hour",
    default=60,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rebalancing checks per simulated hour, each by a provider drawn at random (the same in both arms).",
)
@click.option(
    "--jobs-per-hour",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Inference jobs per simulated hour, matched by scheduler.matching (the same in both arms).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def swarm_sim(
    providers: int, blocks: int, hours: int, seed: int, checks_per_hour: int, jobs_per_hour: int, as_json: bool
) -> None:
    """Hivemart's placement, matching and failover rules against Petals' placement rule on one
    simulated day of churn (hivemart/bench/swarm_sim.py)."""
    from hivemart.bench.swarm_sim import run_swarm_sim

    result = run_swarm_sim(
        providers=providers,
        blocks=blocks,
        hours=hours,
        seed=seed,
        checks_per_hour=checks_per_hour,
        jobs_per_hour=jobs_per_hour,
        progress=lambda msg: click.echo(msg, err=True),
    )
    emit(result, as_json)


@bench.command()
@click.option(
    "--mode",
    default="lora",
    show_default=True,
    type=click.Choice(["ptune", "deep_ptune", "lora"]),
    help="What is trained.",
)
@click.option("--hidden", default=512, show_default=True, help="Hidden size of the generated llama model.")
@click.option("--layers", default=8, show_default=True, help="Transformer blocks.")
@click.option("--providers", default=2, show_default=True, help="Providers the blocks are split across.")
@click.option("--batch-size", default=8, show_default=True, help="Rows per step.")
@click.option("--seq-len", default=128, show_default=True, help="Tokens per row.")
@click.option("--repeats", default=5, show_default=True, help="Timed steps; the median is reported.")
@click.option(
    "--chunk-tokens",
    default=512,
    show_default=True,
    help="Most tokens per request: the batch is split into chunks pipelined through the chain.",
)
@click.option(
    "--provider-threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="torch threads per provider (0: the agent's automatic choice from the block size).",
)
@click.option(
    "--jobs",
    "job_counts",
    callback=_positive_ints,
    help="Measure under load instead: for each count (e.g. 2,4), that many concurrent LoRA jobs, each its "
    "own process, while an inference client generates; aggregate steps/s and the client's ms/token.",
)
@click.option(
    "--load-steps",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --jobs: timed steps per job (after a warm-up step).",
)
@click.option(
    "--new-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --jobs: tokens per generation of the inference client.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def train(
    mode: str,
    hidden: int,
    layers: int,
    providers: int,
    batch_size: int,
    seq_len: int,
    repeats: int,
    chunk_tokens: int,
    provider_threads: int,
    job_counts: list[int] | None,
    load_steps: int,
    new_tokens: int,
    as_json: bool,
) -> None:
    """Seconds per fine-tuning step: local transformers (+PEFT) versus through providers on loopback.

    With --jobs: training throughput under load, one JSON object per job count, then a summary
    object last (jobs, steps_per_s, inference_ms_per_token_idle, inference_ms_per_token, ...)."""
    if job_counts is not None:
        if mode != "lora":
            raise click.BadParameter("training under load runs LoRA jobs; leave --mode at lora", param_hint="--mode")
        from hivemart.bench.finetune import TrainLoad, run_train_load_bench

        summary = run_train_load_bench(
            jobs=job_counts,
            hidden=hidden,
            layers=layers,
            providers=providers,
            load=TrainLoad(batch_size=batch_size, seq_len=seq_len, steps=load_steps, chunk_tokens=chunk_tokens),
            new_tokens=new_tokens,
            repeats=repeats,
            provider_threads=provider_threads,
            progress=lambda msg: click.echo(msg, err=True),
        )
        for report in summary.pop("per_count"):
            emit(report, as_json)
        emit(summary, as_json)
        return
    from hivemart.bench.finetune import run_train_bench

    result = run_train_bench(
        mode=mode,
        hidden=hidden,
        layers=layers,
        providers=providers,
        batch_size=batch_size,
        seq_len=seq_len,
        repeats=repeats,
        chunk_tokens=chunk_tokens,
        provider_threads=provider_threads,
        progress=lambda msg: click.echo(msg, err=True),
    )
    emit(result, as_json)


@bench.command()
@click.option(
    "--minutes",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="How long jobs keep starting under faults (the run goes on until every fault kind ran once).",
)
@click.option(
    "--providers",
    default=5,
    show_default=True,
    type=click.IntRange(min=4),
    help="Provider agents; they split the model in two halves, each served by at least two.",
)
@click.option(
    "--hidden",
    default=64,
    show_default=True,
    type=click.IntRange(min=16),
    help="Hidden size of the generated llama model.",
)
@click.option("--layers", default=4, show_default=True, type=click.IntRange(min=2), help="Transformer blocks.")
@click.option(
    "--new-tokens",
    default=16,
    show_default=True,
    type=click.IntRange(1, 512),
    help="Tokens each inference job generates.",
)
@click.option(
    "--lora-steps", default=6, show_default=True, type=click.IntRange(1, 1000), help="Optimizer steps of each LoRA job."
)
@click.option(
    "--fault-interval",
    default=6.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between one fault's end and the next one's start.",
)
@click.option(
    "--service-faults/--no-service-faults",
    default=True,
    show_default=True,
    help="Restart Redis and PostgreSQL too, when REDIS_URL / DATABASE_URL name servers on this machine.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the choice of victims.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the run keeps its database, model and logs (default: a new temporary directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def chaos(
    minutes: float,
    providers: int,
    hidden: int,
    layers: int,
    new_tokens: int,
    lora_steps: int,
    fault_interval: float,
    service_faults: bool,
    seed: int,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Paid inference and LoRA jobs through a swarm while providers are SIGKILLed, SIGSTOPped and restarted,
    the scheduler's worker is restarted, and (when they are local services) Redis and PostgreSQL too.

    Reports jobs, jobs_exact (outputs equal to a fault-free run), jobs_settled, faults, ledger_consistent,
    credits_lost and orphans; exits with status 1 when a job is neither exact nor failed with a reason,
    or when credits were lost, jobs left unsettled or processes left behind."""
    import sys
    import tempfile

    require_server_stack("bench chaos", "all")
    from hivemart.demo.chaos import ChaosError, ChaosOptions, run_chaos
    from hivemart_core.errors import HivemartError

    home = data_dir or Path(tempfile.mkdtemp(prefix="hivemart-chaos-"))
    options = ChaosOptions(
        home=home,
        minutes=minutes,
        providers=providers,
        hidden=hidden,
        layers=layers,
        new_tokens=new_tokens,
        lora_steps=lora_steps,
        fault_interval=fault_interval,
        service_faults=service_faults,
        seed=seed,
        progress=lambda msg: click.echo(msg, err=True),
    )
    try:
        result = run_chaos(options)
    except KeyboardInterrupt:
        click.echo("\nstopped: every process the chaos run started has been stopped", err=True)
        sys.exit(130)
    except (ChaosError, HivemartError) as e:  # set-up failed: a process did not start, the API refused
        raise click.ClickException(f"{e}\n(logs: {home / 'logs'} and {home / 'swarm'})") from e
    emit(result, as_json)
    problems = [
        name
        for name, bad in (
            ("jobs neither exact nor failed with a reason", result["jobs_inexact"]),
            ("jobs not settled", result["jobs"] - result["jobs_settled"]),
            ("credits lost", result["credits_lost"]),
            ("ledger inconsistent", not result["ledger_consistent"]),
            ("orphans", result["orphans"]),
        )
        if bad
    ]
    if problems:
        raise click.ClickException(f"the chaos run found: {', '.join(problems)} (logs: {home})")
