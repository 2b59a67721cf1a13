"""The demo's phases once the marketplace and the DHT run: providers, client, jobs, settlement."""

from __future__ import annotations

import json
import random
import secrets
import signal
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from client_sdk.money import format_credits
from hivemart.demo.stack import catalog_checkpoint, market_provider_args
from hivemart_core.api import Client
from hivemart_core.errors import HivemartError
from hivemart_core.logs import logs_held

if TYPE_CHECKING:
    import torch

    from client_sdk.swarm.local import LocalSwarm
    from hivemart.demo.options import DemoOptions, DemoState
    from hivemart.demo.stack import LocalMarket

DEMO_PROMPT = "Providers serve the blocks of a model and clients pay for"
# What the fine-tuning job memorises: short enough to learn in a few dozen steps.
FINETUNE_TEXTS = [
    "Hivemart pays providers for verified work, one receipt at a time.",
    "Clients keep the embeddings and the head; providers serve the blocks.",
    "A backup takes over when a provider fails, and the tokens stay the same.",
    "Credits move from the hold to the provider only for receipted work.",
]
# What the demo's client buys with a test top-up (the marketplace's smallest by default).
CLIENT_TOPUP_CREDITS = 100
# Two providers split the model; the third, dearer, holds the first half again and is the plan's
# backup for it: the one the client fails over to when the first hop is killed.
SPANS = {"provider-a": ((0, 3), 1_000_000), "provider-b": ((3, 6), 1_000_000), "provider-c": ((0, 3), 1_200_000)}


class DemoError(Exception):
    """A phase of the demo failed; the message says which and where its logs are."""


def new_password() -> str:
    return secrets.token_urlsafe(12)


def _wait(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Demo:
    """One run of the demo; each public method is a phase and reports its own progress."""

    def __init__(
        self,
        options: DemoOptions,
        state: DemoState,
        market: LocalMarket,
        swarm: LocalSwarm,
        *,
        operator_key: str,
        provider_key: str,
    ) -> None:
        self.options, self.state, self.market, self.swarm = options, state, market, swarm
        self.operator = Client(api_key=operator_key, base_url=market.url)
        self.provider_key = provider_key
        self.client: Client | None = None
        self.username = self.password = self.client_key = ""
        self.model: Any = None
        self.runtime: Any = None
        self.results: dict[str, Any] = {}
        self.jobs: list[int] = []
        self.provider_ids: list[int] = []

    def say(self, text: str) -> None:
        self.options.say(text)

    # --- 4: providers ----------------------------------------------------------------------

    def start_providers(self, *, phase: int) -> None:
        o = self.options
        o.say(
            f"[{phase}/9] adding {self.state.model_id} to the catalog; starting 3 providers that register "
            f"with the marketplace"
        )
        catalog_checkpoint(self.operator, self.state.model_path, name="Hivemart demo llama")
        common = market_provider_args(self.market.url, self.provider_key)
        for name, ((start, end), price) in SPANS.items():
            agent = self.swarm.start_agent(
                self.state.model_path, start, end, name=name, extra_args=[*common, "--price", str(price)]
            )
            o.say(
                f"      {name} ({agent.peer_id[-8:]}) serves blocks {start}:{end} at "
                f"{format_credits(price)} credits per million work units"
            )

        def online() -> bool:
            offers = self.operator.models.offers(self.state.model_id)
            return len([x for x in offers if x.state == "online"]) >= len(SPANS)

        _wait("the providers to come online in the marketplace", online, timeout=60)
        self.provider_ids = [x.provider_id for x in self.operator.models.offers(self.state.model_id)]
        self._wait_probed()

    def _wait_probed(self) -> None:
        """Until the scheduler's probes have measured every provider: from then on the pages
        show, and the plans use, measured throughput, latency and success rate."""

        def measured() -> list[Any]:
            offers = self.operator.models.offers(self.state.model_id)
            return [x for x in offers if x.measured] if all(x.measured for x in offers) else []

        offers = _wait("the scheduler's probes to measure every provider", measured, timeout=120)
        self.say(
            "      probed: "
            + "; ".join(
                f"{x.peer_id[-8:]} {x.throughput or 0:.0f} units/s, {x.latency_ms or 0:.0f} ms, "
                f"{(x.success_rate or 0):.0%} correct"
                for x in offers
            )
        )

    # --- 5: client -------------------------------------------------------------------------

    def fund_client(self, *, phase: int) -> None:
        self.username, self.password = f"demo-client-{random.randrange(16**6):06x}", new_password()
        anonymous = Client(base_url=self.market.url)
        signup = anonymous.accounts.signup(username=self.username, password=self.password)
        anonymous.close()
        self.client_key = signup.api_key.key
        self.client = Client(api_key=self.client_key, base_url=self.market.url)
        # Bought as a user would, through the test payment provider (no account anywhere).
        topup = self.client.payments.topup(credits=CLIENT_TOPUP_CREDITS)
        topup = self.client.payments.test_pay(topup.id)
        self.options.say(
            f"[{phase}/9] client {self.username} signed up and bought {format_credits(topup.credits)} credits "
            f"(test top-up #{topup.id}, {topup.state})"
        )
        self.results["client_start_balance"] = self.client.accounts.me().wallet_balance
        self.results["books_before"] = self._books()

    # --- 6: inference ----------------------------------------------------------------------

    def _open_model(self) -> Any:
        from client_sdk.swarm.model import DistributedModelForCausalLM
        from hivemart_core.swarm.runtime import SwarmRuntime

        if self.model is None:
            self.runtime = SwarmRuntime(self.swarm.initial_peers)
            self.model = DistributedModelForCausalLM.from_pretrained(self.state.model_path, runtime=self.runtime)
        return self.model

    def run_inference(self, *, phase: int) -> None:
        from client_sdk.swarm.job import MarketJob
        from hivemart_core.models import load_tokenizer

        o = self.options
        o.say(
            f"[{phase}/9] inference job: {o.new_tokens} tokens through the plan's providers, one killed at "
            f"token {o.kill_at}"
        )
        model = self._open_model()
        tokenizer = load_tokenizer(self.state.model_path)
        prompt = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
        job = MarketJob.create(
            self.client,
            model=self.state.model_id,
            kind="inference",
            budget=10 * 1_000_000,
            max_price=2_000_000,
            verify_rate=o.verify_rate,
        )
        self.jobs.append(job.job_id)
        job.attach(model)
        route = model.route()
        o.say(f"      job {job.job_id} planned: " + " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end}]" for h in route))
        stamps: list[float] = []
        killed: dict[str, Any] = {}
        with model.inference_session(max_length=prompt.shape[1] + o.new_tokens) as session:

            def on_token(token: torch.Tensor) -> None:
                stamps.append(time.perf_counter())
                o.write(tokenizer.decode(token[:1]))
                if len(stamps) == o.kill_at:
                    killed.update(self._kill_first_hop(session))

            # Log lines (the failover's, above all) wait until the streamed text has ended its line.
            with logs_held():
                o.write(DEMO_PROMPT)
                try:
                    started = time.perf_counter()
                    tokens = model.generate(prompt, max_new_tokens=o.new_tokens, session=session, on_token=on_token)
                    elapsed = time.perf_counter() - started
                finally:
                    o.write("\n")
            failovers = list(session.chain.failovers)
        summary = job.finish()
        exact = self._matches_local(prompt, tokens)
        failover_ok = bool(killed) and any(f["peer_id"] == killed["peer_id"] for f in failovers) and exact
        for f in failovers:
            o.say(
                f"      failover: {f['peer_id'][-8:]} blocks {f['blocks'][0]}:{f['blocks'][1]} -> "
                f"{', '.join(p[-8:] for p in f['replacement'])} in {f['seconds'] * 1000:.0f} ms ({f['reason']})"
            )
        o.say(
            f"      {o.new_tokens / elapsed:.1f} tokens/s; identical to local transformers: {exact}; "
            f"{summary['verification']['checked']} steps shadow-verified, "
            f"{summary['verification']['mismatches']} mismatches"
        )
        self.results.update(
            tokens=o.new_tokens,
            tokens_per_s=round(o.new_tokens / elapsed, 2),
            failover_ok=failover_ok,
            exact_match=exact,
            inference_job=summary,
            killed=killed,
        )

    def _wait_offline_after_kill(self) -> None:
        """The marketplace should know the killed provider is gone before it plans the next
        job (its heartbeats stopped; the scheduler's sweep marks it offline)."""
        killed = self.results.get("killed")
        if not killed or self.results.get("killed_offline"):
            return

        def offline() -> bool:
            offers = self.operator.models.offers(self.state.model_id)
            return all(x.peer_id != killed["peer_id"] or x.state != "online" for x in offers)

        _wait(f"the marketplace to mark {killed['name']} offline", offline, timeout=60)
        self.results["killed_offline"] = True
        self.say(f"      the marketplace marked {killed['name']} offline (no heartbeat); it is out of new plans")

    def _kill_first_hop(self, session: Any) -> dict[str, Any]:
        first = session.chain.route[0]
        victim = next((a for a in self.swarm.agents if a.peer_id == first.peer_id), None)
        if victim is None:
            return {}
        self.options.write(f" [SIGKILL {victim.name}] ")
        victim.process.send_signal(signal.SIGKILL)
        return {"peer_id": victim.peer_id, "name": victim.name, "at": datetime.now(UTC)}

    def _matches_local(self, prompt: torch.Tensor, tokens: torch.Tensor) -> bool:
        import torch
        from transformers import AutoModelForCausalLM

        local = AutoModelForCausalLM.from_pretrained(self.state.model_path, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = local.generate(
                prompt,
                max_new_tokens=tokens.shape[1] - prompt.shape[1],
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return bool(torch.equal(tokens, expected))

    def call_gateway(self, *, phase: int) -> None:
        """One chat completion through ``hivemart serve --market`` (hivemart/demo/gateway.py)."""
        from hivemart.demo.gateway import call_gateway

        self.options.say(f"[{phase}/9] OpenAI-compatible gateway (`hivemart serve --market`): one chat completion")
        self._wait_offline_after_kill()
        result = call_gateway(
            model=self._open_model(), market_url=self.market.url, client_key=self.client_key, say=self.options.say
        )
        if result["job"] is not None:
            self.jobs.append(result["job"])  # settled and checked with the others
        self.results["gateway"] = result

    # --- 7: fine-tuning --------------------------------------------------------------------

    def run_finetune(self, *, phase: int) -> None:
        from client_sdk.finetune import FineTuner, TrainConfig
        from client_sdk.finetune.data import PackedDataset
        from client_sdk.swarm.job import MarketJob
        from hivemart_core.models import load_tokenizer

        o = self.options
        o.say(f"[{phase}/9] fine-tuning job: {o.finetune_steps} LoRA steps through the swarm")
        self._wait_offline_after_kill()
        model = self._open_model()
        job = MarketJob.create(
            self.client,
            model=self.state.model_id,
            kind="finetune",
            budget=20 * 1_000_000,
            max_price=2_000_000,
            verify_rate=0.0,
        )
        self.jobs.append(job.job_id)
        job.attach(model)
        config = TrainConfig(mode="lora", steps=o.finetune_steps, lr=1e-2, batch_size=4, seq_len=24, rank=8)
        dataset = PackedDataset.from_texts(FINETUNE_TEXTS * 4, load_tokenizer(self.state.model_path), config.seq_len)
        tuner = FineTuner(model, config)
        try:
            result = tuner.fit(dataset, progress=True)
            tuner.export(self.options.home / "adapters" / f"job-{job.job_id}")
        finally:
            tuner.close()
        summary = job.finish()
        first, last = result.losses[0], result.losses[-1]
        drop = round(1 - last / first, 4) if first > 0 else 0.0
        o.say(
            f"      loss {first:.3f} -> {last:.3f} ({drop:.0%} lower); adapter saved in PEFT format under "
            f"{self.options.home / 'adapters'}"
        )
        self.results.update(finetune_loss_drop=drop, finetune_job=summary)

    # --- 8: settlement ---------------------------------------------------------------------

    def settle(self, *, phase: int) -> None:
        self.options.say(f"[{phase}/9] waiting for the scheduler to settle jobs {', '.join(map(str, self.jobs))}")

        def settled() -> bool:
            return all(self.client.jobs.get(job_id).state in ("done", "failed", "cancelled") for job_id in self.jobs)

        _wait("the jobs to be settled", settled, timeout=90, interval=1.0)

    def _books(self) -> dict[str, Any]:
        return json.loads(self.market.manage("verify_ledger", "--json"))

    def summary(self, *, seconds: float) -> dict[str, Any]:
        books = self._books()
        before = self.results["books_before"]["balances_by_kind"]
        after = books["balances_by_kind"]
        delta = lambda kind: after.get(kind, 0) - before.get(kind, 0)  # noqa: E731
        spent = self.results["client_start_balance"] - self.client.accounts.me().wallet_balance
        receipts = sum(1 for job_id in self.jobs for _ in self.client.receipts.iter(job=job_id))
        audits = [a for job_id in self.jobs for a in self.client.audits.list(job=job_id).items]
        return {
            "tokens": self.results["tokens"],
            "tokens_per_s": self.results["tokens_per_s"],
            "failover_ok": self.results["failover_ok"],
            "finetune_loss_drop": self.results["finetune_loss_drop"],
            "receipts": receipts,
            "client_spent": spent,
            "providers_earned": delta("earnings"),
            "fees": delta("fees"),
            "ledger_balanced": bool(books["consistent"] and spent == delta("earnings") + delta("fees")),
            "audits": len(audits),
            "audit_verdicts": sorted(a.verdict for a in audits),
            "steps_verified": self.results["inference_job"]["verification"]["checked"],
            **self._probe_counts(),
            "exact_match": self.results["exact_match"],
            "gateway_tokens": self.results["gateway"]["completion_tokens"],
            "jobs": self.jobs,
            "model": self.state.model_id,
            "web": self.market.url,
            "swarm": self.swarm.initial_peers[0],
            # for `hivemart login` against the kept demo (a local, throwaway account)
            "client_api_key": self.client_key,
            "initial_peers": list(self.swarm.initial_peers),  # MADDR for the README's Python snippet
            "model_path": str(self.state.model_path),
            "seconds": round(seconds, 1),
        }

    def _probe_counts(self) -> dict[str, int]:
        """``providers_probed``: providers with at least one measurement; ``probe_failures``:
        measurements with a request unanswered or wrong, except of the provider the demo
        killed once it was dead (its silence then is the point)."""
        killed = self.results.get("killed") or {}
        probed = failures = 0
        for provider_id in self.provider_ids:
            provider = self.operator.providers.get(provider_id)
            measurements = list(self.operator.providers.measurements(provider_id, page_size=100).items)
            probed += bool(measurements)
            failures += sum(
                1
                for m in measurements
                if m.success_rate < 1.0
                and not (provider.peer_id == killed.get("peer_id") and m.measured_at >= killed["at"])
            )
        return {"providers_probed": probed, "probe_failures": failures}

    def print_summary(self, s: dict[str, Any]) -> None:
        lines = [
            f"tokens generated      {s['tokens']} at {s['tokens_per_s']} tokens/s (identical to local: "
            f"{s['exact_match']}); failover {'ok' if s['failover_ok'] else 'FAILED'}",
            f"fine-tuning           loss {s['finetune_loss_drop']:.0%} lower",
            f"receipts settled      {s['receipts']}; {s['steps_verified']} steps shadow-verified; "
            f"{s['audits']} audits {s['audit_verdicts'] or ''}",
            f"probes                {s['providers_probed']} providers measured by the scheduler; "
            f"{s['probe_failures']} failed probes",
            f"client spent          {format_credits(s['client_spent'])} credits",
            f"providers earned      {format_credits(s['providers_earned'])} credits",
            f"platform fees         {format_credits(s['fees'])} credits",
            f"ledger balanced       {s['ledger_balanced']}",
            f"web                   {s['web']}  (log in as {self.username} / {self.password})",
            f"swarm                 {s['swarm']}",
            f"client API key        {s['client_api_key']}  (hivemart login --url {s['web']} --api-key ...)",
            f"took                  {s['seconds']} s",
        ]
        self.say("\n".join(lines))

    def keep_running(self) -> None:
        self.say(
            f"everything keeps running: the marketplace at {self.market.url}, the swarm at "
            f"{self.swarm.initial_peers[0]}; Ctrl-C stops it all"
        )
        while self.market.alive():
            time.sleep(1)
        raise DemoError("a marketplace process stopped; see the logs under " + str(self.market.logs))

    def close(self) -> None:
        closers = [
            getattr(self.model, "close", None),
            getattr(self.runtime, "shutdown", None),
            getattr(self.client, "close", None),
            self.operator.close,
        ]
        for close in closers:
            if close is not None:
                try:
                    close()
                except (HivemartError, OSError, RuntimeError):
                    pass
