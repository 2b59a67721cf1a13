"""``hivemart finetune``: prompt tuning, deep prompt tuning or LoRA through the swarm."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hivemart.cli._jobs import open_paid_job, paid_job_options, paid_options_check, ticket_hint
from hivemart.cli._root import api_error_text, cli, initial_peers_callback

_MODES = ("ptune", "deep_ptune", "lora")


@cli.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="HIVEMART_MODEL",
    help="Checkpoint directory of the model (the client loads only its embeddings, final norm and head).",
)
@click.option(
    "--initial-peers",
    multiple=True,
    required=True,
    envvar="HIVEMART_INITIAL_PEERS",
    callback=initial_peers_callback,
    help="Multiaddr of a peer in the swarm (repeatable).",
)
@click.option("--mode", type=click.Choice(_MODES), default="lora", show_default=True, help="What to train.")
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Training data: JSONL with a "text" field per line, or plain text, one example per line.',
)
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Optimizer steps in all.")
@click.option(
    "--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate."
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Rows per step.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=2), help="Tokens per row.")
@click.option(
    "--prefix-len", default=16, show_default=True, type=click.IntRange(min=1), help="Prompt tokens (ptune, deep_ptune)."
)
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option(
    "--alpha",
    default=16.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="LoRA alpha (scaling = alpha / rank).",
)
@click.option(
    "--targets",
    default="q_proj,v_proj",
    show_default=True,
    help="LoRA target layers, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).",
)
@click.option("--seed", default=0, show_default=True, help="Initialisation and data-order seed.")
@click.option(
    "--checkpoint",
    "checkpoint_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for checkpoints (state.pt), written every --checkpoint-every steps and at the end.",
)
@click.option("--checkpoint-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint if there is one.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to save the result: a PEFT adapter (lora) or prompts.safetensors.",
)
@click.option(
    "--max-chunk-tokens",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens per request; larger batches are split into chunks run concurrently.",
)
@paid_job_options(
    what="fine-tuning job",
    budget=20_000_000,
    job_help="Run the existing finetune job ID (made with `hivemart jobs create --kind finetune`).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
def finetune(
    model_path: Path,
    initial_peers: list[str],
    mode: str,
    data_path: Path,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    prefix_len: int,
    rank: int,
    alpha: float,
    targets: str,
    seed: int,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    out_dir: Path | None,
    max_chunk_tokens: int,
    paid: bool,
    job_id: int | None,
    budget: int,
    max_price: int,
    base_url: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Fine-tune a model served by the swarm; the trained parts stay on this machine. Free
    providers serve it as is; with --paid or --job it runs as a marketplace job."""
    from client_sdk.finetune.data import DataError, load_texts
    from client_sdk.finetune.trainer import TrainConfig, train
    from client_sdk.swarm.model import DistributedModelForCausalLM
    from hivemart_core.errors import APIError, HivemartError

    paid_options_check(paid, job_id)
    if resume and checkpoint_dir is None:
        raise click.BadParameter("--resume needs --checkpoint", param_hint="--resume")
    try:
        config = TrainConfig(
            mode=mode,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seq_len=seq_len,
            prefix_len=prefix_len,
            rank=rank,
            alpha=alpha,
            seed=seed,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            checkpoint_every=checkpoint_every,
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    try:
        texts = load_texts(data_path)  # before connecting: a bad file fails fast
    except DataError as e:
        raise click.ClickException(str(e)) from e
    try:
        model = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers)
    except HivemartError as e:
        raise click.ClickException(str(e)) from e
    job = None
    job_summary = None
    try:
        if paid or job_id is not None:
            job = open_paid_job(
                model, base_url=base_url, budget=budget, max_price=max_price, kind="finetune", job_id=job_id
            )
        model.remote.max_chunk_tokens = max_chunk_tokens
        result = train(
            model, texts, config, checkpoint_dir=checkpoint_dir, resume=resume, out_dir=out_dir, progress=not quiet
        )
        job_summary = job.finish() if job is not None else None
    except APIError as e:
        raise click.ClickException(api_error_text(e)) from e
    except (HivemartError, DataError) as e:
        raise click.ClickException(ticket_hint(str(e), "finetune")) from e
    finally:
        if job is not None:
            if job_summary is None and job.job.state not in ("failed", "cancelled", "done", "settling"):
                _finish_quietly(job)  # what was done is paid; the rest of the hold comes back
            job.detach()
            job.client.close()
        model.close()
    summary = {
        "mode": mode,
        "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "seconds_per_step": round(result.seconds_per_step, 4),
        "out": result.out_dir,
        "checkpoint": None if checkpoint_dir is None else str(checkpoint_dir),
        "failovers": len(model.remote.failovers),
        "job": job_summary["job"] if job_summary else None,
        "job_state": job_summary["state"] if job_summary else None,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            click.echo(f"{key:<16}  {value}")


def _finish_quietly(job: object) -> None:
    from hivemart_core.errors import HivemartError

    try:
        job.finish()  # type: ignore[attr-defined]
    except HivemartError:
        pass  # the job times out on the marketplace instead; its hold is released then
