"""``hivemart generate``: stream a completion from the swarm, free or as a paid marketplace job."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from hivemart.cli._config import load_config
from hivemart.cli._root import api_error_text, cli, initial_peers_callback


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
    "--paid",
    is_flag=True,
    help="Run as a marketplace job (uses `hivemart login`'s key): the plan's "
    "providers, tickets, receipts and settlement.",
)
@click.option(
    "--budget",
    default=5_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --paid: micro-credits to hold.",
)
@click.option(
    "--max-price",
    default=2_000_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="With --paid: highest price, micro-credits per million work units.",
)
@click.option("--url", "base_url", help="With --paid: the marketplace (default: saved, or HIVEMART_URL).")
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
    paid: bool,
    budget: int,
    max_price: int,
    base_url: str | None,
    adapter_dir: Path | None,
    as_json: bool,
) -> None:
    """Generate a completion of PROMPT through the swarm's providers."""
    import torch

    from client_sdk.swarm.model import DistributedModelForCausalLM
    from hivemart_core.errors import APIError, HivemartError
    from hivemart_core.models import load_tokenizer

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    job = None
    try:
        tokenizer = load_tokenizer(model_path)
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        model = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers)
    except HivemartError as e:
        raise click.ClickException(str(e)) from e
    try:  # a bad adapter directory is reported before anything runs on the swarm
        adapter = None if adapter_dir is None else model.load_adapter(adapter_dir)
    except HivemartError as e:
        model.close()
        raise click.ClickException(str(e)) from e
    try:
        if paid:
            job = _open_job(model, base_url=base_url, budget=budget, max_price=max_price)
        stream = (lambda token: None) if as_json else (lambda token: _write(tokenizer.decode(token[:1])))
        if not as_json:
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
    except APIError as e:
        raise click.ClickException(api_error_text(e)) from e
    except HivemartError as e:
        raise click.ClickException(str(e)) from e
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
                }
            )
        )
    else:
        _write("\n")
        if summary:
            click.echo(f"job {summary['job']}: receipts {summary['receipts']}", err=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _open_job(model: object, *, base_url: str | None, budget: int, max_price: int):  # -> MarketJob
    from client_sdk.swarm.job import MarketJob
    from hivemart_core.api import Client
    from hivemart_core.errors import InsufficientCreditsError

    config = load_config(base_url=base_url)
    if not config.api_key:
        raise click.ClickException("--paid needs an API key: run `hivemart login` or set HIVEMART_API_KEY")
    client = Client(api_key=config.api_key, base_url=config.base_url)
    try:
        job = MarketJob.create(client, model=model.info.model_id, budget=budget, max_price=max_price)
    except InsufficientCreditsError as e:
        client.close()
        raise click.ClickException(
            f"{e}: a paid job holds its --budget ({budget} micro-credits) up front; lower --budget, or get "
            f"credits (`hivemart balance` shows what you have)"
        ) from e
    job.attach(model)
    return job
