"""``hivemart generate``: stream a completion from the swarm, free or as a paid marketplace job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hivemart.cli._jobs import open_paid_job, paid_job_options, paid_options_check, ticket_hint
from hivemart.cli._root import api_error_text, cli, failure_hint, initial_peers_callback
from hivemart_core.figures import format_credits

if TYPE_CHECKING:
    from hivemart_core.api import Job


@cli.command()
@click.argument("prompt")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The model's checkpoint directory (the client runs embeddings and head locally).",
)
@click.option(
    "--initial-peers",
    multiple=True,
    envvar="HIVEMART_INITIAL_PEERS",
    required=True,
    callback=initial_peers_callback,
    help="A bootstrap multiaddr of the swarm (repeatable).",
)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=1e-4))
@click.option("--top-k", type=click.IntRange(min=1))
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling (reproducible output).")
@click.option(
    "--chat",
    is_flag=True,
    help="PROMPT is a user's message: frame it with the model's chat template and print only the reply.",
)
@paid_job_options(
    what="job",
    budget=5_000_000,
    job_help="Run the existing inference job ID (made with `hivemart jobs create`) instead of a new one.",
)
@click.option(
    "--adapter",
    "adapter_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A PEFT LoRA adapter directory (from `hivemart finetune --out`, or any PEFT LoRA of the "
    "model) that the providers apply while generating.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(
    prompt: str,
    model_path: Path,
    initial_peers: list[str],
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    chat: bool,
    paid: bool,
    job_id: int | None,
    budget: int,
    max_price: int,
    base_url: str | None,
    adapter_dir: Path | None,
    as_json: bool,
) -> None:
    """Generate a completion of PROMPT through the swarm's providers (free ones; with --paid or
    --job, the providers of a marketplace job)."""
    import torch

    from client_sdk.swarm.model import DistributedModelForCausalLM
    from hivemart_core.errors import APIError, HivemartError
    from hivemart_core.models import load_tokenizer

    paid_options_check(paid, job_id)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    job = None
    try:
        tokenizer = load_tokenizer(model_path)
        input_ids = chat_input_ids(tokenizer, prompt) if chat else tokenizer(prompt, return_tensors="pt").input_ids
        model = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers)
    except HivemartError as e:
        raise click.ClickException(str(e)) from e
    try:  # a bad adapter directory is reported before anything runs on the swarm
        adapter = None if adapter_dir is None else model.load_adapter(adapter_dir)
    except HivemartError as e:
        model.close()
        raise click.ClickException(str(e)) from e
    try:
        if paid or job_id is not None:
            job = open_paid_job(
                model, base_url=base_url, budget=budget, max_price=max_price, kind="inference", job_id=job_id
            )
        stream = (lambda token: None) if as_json else (lambda token: _write(tokenizer.decode(token[:1])))
        if not as_json and not chat:
            _write(prompt)
        started = time.perf_counter()
        tokens = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            on_token=stream,
            adapter=adapter,
        )
        elapsed = time.perf_counter() - started
        summary = job.finish() if job is not None else None
        marketplace_job = job.client.jobs.get(job.job_id) if job is not None else None
    except APIError as e:
        raise click.ClickException(api_error_text(e)) from e
    except HivemartError as e:
        text = ticket_hint(str(e), "generate")
        hint = failure_hint(str(e))
        raise click.ClickException(text + (f" (hint: {hint})" if hint else "")) from e
    finally:
        if adapter is not None:  # its copies on the providers: deleted (best effort: they also expire there)
            with contextlib.suppress(HivemartError):
                model.release_adapter(adapter)
        if job is not None:
            job.detach()
            job.client.close()
        model.close()
    new = tokens[0, input_ids.shape[1] :]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": tokenizer.decode(new),
                    "tokens": int(new.numel()),
                    "tokens_per_s": round(new.numel() / elapsed, 2),
                    "job": summary["job"] if summary else None,
                    "receipts": summary["receipts"] if summary else None,
                    "cost": summary["receipts"]["cost"] if summary else None,
                    "job_cost": dataclasses.asdict(marketplace_job.cost)
                    if marketplace_job and marketplace_job.cost
                    else None,
                }
            )
        )
    else:
        _write("\n")
        if summary:
            click.echo(paid_summary(summary, marketplace_job), err=True)


def chat_input_ids(tokenizer: Any, message: str) -> Any:
    """``message`` as a user's turn through the model's chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise click.ClickException(
            "this model's tokenizer has no chat template; drop --chat (or add chat_template.jinja to the checkpoint)"
        )
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def paid_summary(summary: dict[str, Any], job: Job | None) -> str:
    """What a paid run did and cost, for a person: the work received and its price in credits,
    what the marketplace has charged so far and what it still holds, and where to look next."""
    receipts = summary["receipts"]
    refused = sum(receipts.get("refused", {}).values())
    lines = [
        f"job {summary['job']} ({summary.get('state', '?')}): {receipts['units_received']} work units in "
        f"{receipts['sessions']} session(s), {receipts['countersigned']} receipt(s) countersigned"
        + (f", {refused} refused" if refused else "")
        + (f", {receipts['disputed']} disputed" if receipts.get("disputed") else ""),
        f"cost: {format_credits(receipts['cost'])} credits at the plan's prices",
    ]
    if job is not None and job.cost is not None:
        lines.append(
            f"charged so far {format_credits(job.cost.spent)}, still held {format_credits(job.cost.held)}, "
            f"refunded {format_credits(job.cost.refunded)} credits; the rest of the hold returns when the job "
            f"settles (`hivemart jobs show {summary['job']}`)"
        )
    return "\n".join(lines)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
