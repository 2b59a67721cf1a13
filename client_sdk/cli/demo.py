"""``hivemart demo``: the whole system on this machine, with nothing to install.

Today it runs the swarm: it generates a small model, starts a bootstrap DHT node and three
provider agents on loopback, and streams a generation through them, checking it against
local ``transformers``. Every process it starts stops with it (Ctrl-C included).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from client_sdk.cli._root import cli

DEMO_PROMPT = "Providers serve the blocks of a model and clients pay for"


def _data_dir(path: Path | None) -> Path:
    return Path(path or os.environ.get("HIVEMART_HOME") or Path.cwd() / ".hivemart" / "demo")


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the demo keeps its model and logs (default: $HIVEMART_HOME or ./.hivemart/demo).")
@click.option("--new-tokens", default=48, show_default=True, help="Tokens to generate.")
@click.option("--keep", is_flag=True, help="Keep the swarm running until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
def demo(data_dir: Path | None, new_tokens: int, keep: bool, as_json: bool) -> None:
    """Run a local swarm and a generation through it."""
    import torch
    from transformers import AutoModelForCausalLM

    from client_sdk.models import create_model, load_tokenizer
    from client_sdk.swarm.local import LocalSwarm
    from client_sdk.swarm.model import DistributedModelForCausalLM
    from client_sdk.swarm.runtime import SwarmRuntime

    say = lambda msg: click.echo(msg, err=as_json)  # noqa: E731 - keep stdout clean for --json
    home = _data_dir(data_dir)
    home.mkdir(parents=True, exist_ok=True)
    model_path = home / "models" / "demo-llama"
    if not (model_path / "config.json").exists():
        say(f"[1/4] generating the demo model in {model_path}")
        create_model(model_path, arch="llama", hidden=256, layers=6, seed=0)
    else:
        say(f"[1/4] using the demo model in {model_path}")
    tokenizer = load_tokenizer(model_path)
    prompt = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids

    spans = [(0, 2), (2, 4), (4, 6)]
    with LocalSwarm(workdir=home / "swarm") as swarm:
        say("[2/4] starting a bootstrap DHT node")
        swarm.start_bootstrap()
        say(f"[3/4] starting {len(spans)} providers")
        for agent, (start, end) in zip(swarm.start_agents(model_path, spans), spans):
            say(f"      provider {agent.peer_id[-8:]} serves blocks {start}:{end}")
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(model_path, runtime=runtime)
            route = model.route()
            say("[4/4] generating through " + " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end}]" for h in route))
            click.echo(DEMO_PROMPT, nl=False, err=as_json)
            started = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=new_tokens, on_token=lambda t: click.echo(
                tokenizer.decode(t[:1]), nl=False, err=as_json))
            elapsed = time.perf_counter() - started
            click.echo("", err=as_json)
        local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        summary = {"tokens": new_tokens, "tokens_per_s": round(new_tokens / elapsed, 2),
                   "providers": len(spans), "exact_match": bool(torch.equal(tokens, expected))}
        say(f"{summary['tokens_per_s']} tokens/s through {len(spans)} providers; "
            f"identical to local transformers: {summary['exact_match']}")
        if keep:
            say(f"the swarm keeps running; join it with --initial-peers {swarm.initial_peers[0]}; Ctrl-C stops it")
            try:
                while all(a.process.poll() is None for a in swarm.agents):
                    time.sleep(1)
            except KeyboardInterrupt:
                say("stopping")
    if as_json:
        click.echo(json.dumps(summary))
    if not summary["exact_match"]:
        raise click.ClickException("the swarm's generation differed from local transformers")
