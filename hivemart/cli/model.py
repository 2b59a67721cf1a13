"""``hivemart model ...``: create and inspect checkpoints.

torch and transformers are imported inside the commands, so ``hivemart --help`` stays quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hivemart.cli._root import cli
from hivemart_core.errors import ModelError

# Mirrors hivemart_core.models.SUPPORTED_ARCHS / DTYPES without importing torch at startup.
ARCHS = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "float16", "bfloat16")


def _model_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report a ModelError as a one-line error (exit status 1) rather than a traceback."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ModelError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, list):
            click.echo(f"{key:<{width}}")
            for i, item in enumerate(value):
                click.echo(f"  {i:>4}  {item}")
        else:
            click.echo(f"{key:<{width}}  {value}")


def _describe(path: Path) -> dict:
    from dataclasses import asdict

    from hivemart_core.models import load_model_info

    info = asdict(load_model_info(path))
    info["path"] = str(info["path"])
    return info


@cli.group()
def model() -> None:
    """Create and inspect model checkpoints."""


@model.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", default="llama", show_default=True, type=click.Choice(ARCHS), help="Architecture.")
@click.option("--hidden", default=512, show_default=True, type=click.IntRange(min=8), help="Hidden size.")
@click.option("--layers", default=8, show_default=True, type=click.IntRange(min=1), help="Transformer blocks.")
@click.option("--heads", type=click.IntRange(min=1), help="Attention heads [default: max(2, hidden // 64)].")
@click.option(
    "--kv-heads",
    type=click.IntRange(min=1),
    help="Key/value heads; fewer than --heads for grouped-query attention [default: --heads].",
)
@click.option(
    "--intermediate",
    type=click.IntRange(min=1),
    help="MLP width [default: 2.75 x hidden rounded up to a multiple of 64].",
)
@click.option(
    "--vocab-size",
    default=2048,
    show_default=True,
    type=click.IntRange(min=300),
    help="Vocabulary; the tokenizer is trained to exactly this size.",
)
@click.option(
    "--max-position",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest sequence (max_position_embeddings).",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Weight seed.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES), help="Storage dtype.")
@click.option("--max-shard-size", help="Write a sharded checkpoint with shards up to this size, e.g. 200MB.")
@click.option("--tie-embeddings", is_flag=True, help="Share the embedding matrix with the LM head.")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing the model.")
@_model_errors
def create(
    out: Path,
    arch: str,
    hidden: int,
    layers: int,
    heads: int | None,
    kv_heads: int | None,
    intermediate: int | None,
    vocab_size: int,
    max_position: int,
    seed: int,
    dtype: str,
    max_shard_size: str | None,
    tie_embeddings: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Write a deterministic checkpoint and tokenizer to OUT.

    Identical options give identical files. OUT loads with transformers'
    AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained.
    """
    from hivemart_core.models import create_model

    path = create_model(
        out,
        arch=arch,
        hidden=hidden,
        layers=layers,
        seed=seed,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        max_position=max_position,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tie_embeddings=tie_embeddings,
        overwrite=force,
    )
    info = _describe(path)
    if not as_json:
        click.echo(f"created {info['model_id']} in {path}", err=True)
    _emit(info, as_json)


@model.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_errors
def info(path: Path, as_json: bool) -> None:
    """Describe the checkpoint at PATH: model id, shape, dtype and digest."""
    _emit(_describe(path), as_json)


@model.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--write", is_flag=True, help="Store the digests in PATH/hivemart-digests.json.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_errors
def digest(path: Path, write: bool, as_json: bool) -> None:
    """Compute the model, client and block digests of PATH from its weights.

    Reads every weight. Exits with status 1 if PATH/hivemart-digests.json exists, is
    fresh and disagrees with the weights (unless --write replaces it).
    """
    from hivemart_core.models import DIGEST_FILE, compute_digests, model_digest, write_digest_file

    digests = compute_digests(path)
    cached = model_digest(path) if (path / DIGEST_FILE).is_file() else None
    if write:
        write_digest_file(path, digests)
        click.echo(f"wrote {path / DIGEST_FILE}", err=True)
    _emit(digests, as_json)
    if cached is not None and cached != digests["model"] and not write:
        raise click.ClickException(
            f"{path / DIGEST_FILE} disagrees with the weights; rewrite it with `hivemart model digest --write {path}`"
        )
