"""``hivemart demo``: the whole marketplace on one machine, from nothing, in a few minutes.

Phases (each prints a numbered progress line):
 1. generate the demo model (a real checkpoint and tokenizer) in the data directory;
 2. migrate the marketplace's database and start its web server;
 3. start the scheduler (worker and beat); the bootstrap DHT node started before the web
    server, whose Sell page shows its address and whose probes join the swarm through it;
 4. add the model to the catalog; start three provider agents that register with the
    marketplace, heartbeat and require job tickets; wait until the scheduler's probes have
    measured each of them (the plans then use measured figures);
 5. sign up a client and fund it;
 6. run a paid inference job: the plan's providers generate, tokens stream to the terminal,
    one provider is SIGKILLed midway and the client fails over to its backup; the tokens are
    checked against local ``transformers``; then one chat completion through the OpenAI-compatible
    gateway (``hivemart serve --market``, hivemart/demo/gateway.py), paid as a job of its own;
 7. run a short paid LoRA fine-tuning job through the swarm;
 8. wait for the scheduler to settle both jobs and check the books;
 9. print a summary (and, with ``--keep``, leave everything running until Ctrl-C).

Every process is a subprocess with the kernel's parent-death signal, stopped in reverse order
on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import ExitStack
from typing import Any

from hivemart.demo.options import DemoOptions, DemoState
from hivemart.demo.phases import Demo, DemoError
from hivemart.demo.stack import LocalMarket

__all__ = ["DemoOptions", "DemoError", "run_demo"]


def _phase(options: DemoOptions, number: int, text: str) -> None:
    options.say(f"[{number}/9] {text}")


def _generate_model(options: DemoOptions, state: DemoState) -> None:
    from hivemart_core.models import create_model, load_model_info

    path = options.home / "models" / "demo-llama"
    if not (path / "config.json").exists():
        _phase(options, 1, f"generating the demo model in {path}")
        create_model(path, arch="llama", hidden=256, layers=6, seed=0)
    else:
        _phase(options, 1, f"using the demo model in {path}")
    info = load_model_info(path)
    # The scheduler's validator finds reference checkpoints as HIVEMART_MODELS_DIR/<model_id>.
    link = options.home / "models" / info.model_id
    if not link.exists():
        link.symlink_to(path.name)
    state.model_path, state.model_id = path, info.model_id


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run every phase; returns the summary. Raises :class:`DemoError` or KeyboardInterrupt."""
    from client_sdk.swarm.local import LocalSwarm

    _sigterm_as_interrupt()
    # Show every failover the client makes: resilience is part of what the demo shows.
    for name in ("client_sdk.swarm.remote", "client_sdk.swarm.job"):
        logging.getLogger(name).setLevel(logging.INFO)
    options.home.mkdir(parents=True, exist_ok=True)
    state = DemoState()
    started = time.monotonic()
    _generate_model(options, state)
    with ExitStack() as stack:
        swarm = stack.enter_context(LocalSwarm(workdir=options.home / "swarm"))
        market = stack.enter_context(LocalMarket(options.home, extra_env=demo_market_env()))
        _phase(
            options,
            2,
            f"starting the marketplace at {market.url} "
            f"({'PostgreSQL' if os.environ.get('DATABASE_URL') else 'SQLite'}, "
            f"{'Redis' if os.environ.get('REDIS_URL') else 'embedded broker'})",
        )
        market.manage("migrate", "--no-input")
        operator_key = market.manage("create_api_key", "demo-operator", "--create", "--staff", "--name", "demo").strip()
        provider_key = market.manage("create_api_key", "demo-provider", "--create", "--name", "demo").strip()
        # The bootstrap node first: the marketplace shows its address on the Sell page and the
        # scheduler's probes join the swarm through it (HIVEMART_SWARM_PEERS).
        swarm.start_bootstrap()
        market.extra_env["HIVEMART_SWARM_PEERS"] = ",".join(swarm.initial_peers)
        market.start_web()

        _phase(options, 3, f"started a bootstrap DHT node at {swarm.initial_peers[0]}; starting the scheduler")
        market.start_scheduler()

        demo = Demo(options, state, market, swarm, operator_key=operator_key, provider_key=provider_key)
        stack.callback(demo.close)
        demo.start_providers(phase=4)
        demo.fund_client(phase=5)
        demo.run_inference(phase=6)
        demo.call_gateway(phase=6)
        demo.run_finetune(phase=7)
        demo.settle(phase=8)
        summary = demo.summary(seconds=time.monotonic() - started)
        _phase(options, 9, "done")
        demo.print_summary(summary)
        options.emit_summary(summary)
        if options.keep:
            demo.keep_running()
    return summary


# Agents heartbeat this often in the demo (and in the Sell page's command the demo's market shows).
DEMO_HEARTBEAT_PERIOD_S = 2


def market_env() -> dict[str, str]:
    """Scheduler knobs for a demo that should settle in seconds rather than minutes."""
    # The demo's web site is plain HTTP on loopback (LocalMarket sets HIVEMART_HTTPS=false).
    # Agents heartbeat every 2 s here and a provider silent for 3 periods is gone: the one the
    # inference job kills is offline (and out of later plans) within seconds, and a provider
    # started from the Sell page's command (which says --heartbeat-period 2) stays online.
    return {
        "HIVEMART_HEARTBEAT_PERIOD_S": str(DEMO_HEARTBEAT_PERIOD_S),
        "HIVEMART_HEARTBEAT_TIMEOUT_S": str(3 * DEMO_HEARTBEAT_PERIOD_S),
        "HIVEMART_HOUSEKEEPING_INTERVAL_S": "2",
        "HIVEMART_SETTLE_INTERVAL_S": "2",
        "HIVEMART_SETTLE_GRACE_S": "2",
        "HIVEMART_MATCH_ON_CREATE": "true",
        "HIVEMART_SETTLE_ON_UPLOAD": "true",
        # The wallet's "buy credits" works with no payment account anywhere: the test payment
        # provider (off in production unless set; docs/operators.md).
        "HIVEMART_TEST_TOPUPS": "true",
    }


def demo_market_env() -> dict[str, str]:
    """:func:`market_env` plus probes every few seconds, so the pages and matching use measured
    figures within the demo's first minute (the scheduler joins the swarm through
    ``HIVEMART_SWARM_PEERS``, which :func:`run_demo` sets once the bootstrap node runs)."""
    return {**market_env(), "HIVEMART_PROBE_INTERVAL_S": "5"}
