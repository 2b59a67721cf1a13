"""``hivemart bench chaos``: paid jobs through a swarm while its processes are killed, stopped and restarted.

The run builds what ``hivemart demo`` builds (the marketplace's web server, scheduler worker
and beat, a bootstrap DHT node) with ``providers`` provider agents that split the model in two
halves, every half served by at least two of them (primaries and backups). Then, for
``minutes``, a client runs paid inference and LoRA jobs one after the other while a fault
thread, every ``fault_interval`` seconds, does one of :data:`FAULT_KINDS` in turn:

- ``provider_sigkill``: SIGKILL a provider, and start it again (same identity) a little later;
- ``provider_sigstop``: SIGSTOP a provider for ``stop_s`` seconds, then SIGCONT it;
- ``provider_restart``: SIGTERM a provider and start it again at once;
- ``worker_restart``: SIGKILL the Celery worker and start it again;
- ``redis_restart`` / ``postgres_restart``: only when ``REDIS_URL`` / ``DATABASE_URL`` name a
  server on this machine (127.0.0.1 or localhost), and ``service_faults`` allows it:
  ``redis-cli shutdown nosave`` and a new ``redis-server``; ``pg_ctlcluster ... restart``.

A provider is only faulted while every half keeps another live provider, so a job may always
finish. What is checked, and reported as one JSON object:

- every job either finished with outputs equal to a fault-free run (inference: the tokens of
  local ``transformers`` greedy generation; LoRA: the losses of a fault-free reference run of
  the same job, made before the faults start) or failed with a reason (the job is then
  cancelled with that reason, and what is left of its hold returns to the client);
- every job is settled: in a final state, its hold closed and empty;
- the ledger is consistent, and the client's spend is exactly the providers' earnings plus
  the platform's fees (``credits_lost`` is the difference);
- no process the run started outlives it: each carries :data:`RUN_ENV` in its environment
  (children inherit it), and ``/proc`` is scanned for it at the end (``orphans``).

A process that exits when no fault asked it to (a crashed worker, say) is a finding too: it
is listed under ``unplanned_exits`` with the end of its log, and started again so that the
run goes on. Faults come one at a time, so on a busy machine their rate is bounded by how
long a provider takes to start again.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from client_sdk.money import MICRO_PER_CREDIT
from client_sdk.processes import log_tail
from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart.demo.phases import FINETUNE_TEXTS, new_password
from hivemart.demo.scenario import market_env
from hivemart.demo.stack import LocalMarket, MarketProcess, catalog_checkpoint, market_provider_args
from hivemart_core.api import Client

__all__ = ["ChaosOptions", "ChaosError", "FAULT_KINDS", "RUN_ENV", "run_chaos", "find_tagged_processes"]

FAULT_KINDS = (
    "provider_sigkill",
    "provider_sigstop",
    "provider_restart",
    "worker_restart",
    "redis_restart",
    "postgres_restart",
)
# Every process the run starts carries this variable (set to the run's id) in its environment.
RUN_ENV = "HIVEMART_CHAOS_RUN"
PROMPTS = [
    "Providers serve the blocks of a model and clients pay for",
    "A backup takes over when a provider fails, and",
    "Credits move from the hold to the provider only",
]
PRICE = 1_000_000  # micro-credits per million work units, every provider alike
_TERMINAL = ("done", "failed", "cancelled")
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
# LoRA losses of a job under faults must equal the reference run's within this (relative, absolute).
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6


class ChaosError(Exception):
    """The run could not be set up or wound down; the message says what and where the logs are."""


class JobNotCreated(ChaosError):
    """The marketplace refused to create a job (no hold was placed)."""


@dataclass
class ChaosOptions:
    home: Path  # data directory: database (SQLite by default), model, keys, logs
    minutes: float = 5.0  # jobs keep starting until this much time under faults has passed
    providers: int = 5  # provider agents, split over two halves of the model (at least 4)
    hidden: int = 64  # size of the generated llama model
    layers: int = 4
    new_tokens: int = 16  # tokens per inference job
    lora_steps: int = 6  # optimizer steps per LoRA job
    fault_interval: float = 6.0  # seconds between the end of one fault and the start of the next
    down_s: float = 2.0  # how long a SIGKILLed provider stays down before it is started again
    stop_s: float = 3.0  # how long a SIGSTOPped provider stays stopped
    service_faults: bool = True  # restart Redis/PostgreSQL when they are local configured services
    seed: int = 0  # the order of fault victims
    progress: Callable[[str], None] = lambda message: None


@dataclass
class JobOutcome:
    """One chaos job: what it produced and how it ended."""

    job_id: int
    kind: str  # inference | finetune
    exact: bool = False  # finished with outputs equal to the fault-free run's
    reason: str = ""  # why it failed (empty when it finished)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job_id, "kind": self.kind, "exact": self.exact, "reason": self.reason, **self.detail}


# --- services ---------------------------------------------------------------------------------------


def local_service(url: str, schemes: tuple[str, ...]) -> tuple[str, int] | None:
    """(host, port) of ``url`` when it names a server of one of ``schemes`` on this machine."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in schemes or parts.hostname not in _LOCAL_HOSTS:
        return None
    default = 6379 if parts.scheme.startswith("redis") else 5432
    return parts.hostname, parts.port or default


def _untagged_env() -> dict[str, str]:
    """The environment for services the run restarts: they must outlive it, so no run tag."""
    return {k: v for k, v in os.environ.items() if k != RUN_ENV}


def _command(argv: list[str], timeout: float = 60.0) -> None:
    result = subprocess.run(
        argv, env=_untagged_env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise ChaosError(f"`{' '.join(argv)}` failed ({result.returncode}): {(result.stderr or result.stdout)[-500:]}")


def restart_redis(host: str, port: int) -> None:
    """Shut the Redis server down without saving and start a fresh one on the same port."""
    try:
        _command(["redis-cli", "-h", host, "-p", str(port), "shutdown", "nosave"])
    except ChaosError as e:
        if "connection" not in str(e).lower():  # when it is down already, starting it is all that is left
            raise
    _command(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    )
    _wait_for(
        lambda: (
            subprocess.run(
                ["redis-cli", "-h", host, "-p", str(port), "ping"], capture_output=True, text=True, env=_untagged_env()
            ).stdout.strip()
            == "PONG"
        ),
        f"Redis on port {port} to answer",
        30,
    )


def restart_postgres() -> None:
    """Restart the machine's PostgreSQL cluster (Debian's pg_ctlcluster, cluster ``main``)."""
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        raise ChaosError("no PostgreSQL cluster under /etc/postgresql")
    _command(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"], timeout=120)


def _wait_for(check: Callable[[], Any], what: str, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except Exception:  # noqa: BLE001 - a service coming back answers with errors for a while
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- orphans ------------------------------------------------------------------------------------------


def find_tagged_processes(run_id: str) -> list[int]:
    """PIDs of live processes (zombies aside) whose environment carries ``RUN_ENV=run_id``."""
    needle = f"{RUN_ENV}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != b"Z":
            found.append(int(entry))
    return found


def _count_orphans(run_id: str, grace: float = 15.0) -> list[int]:
    """Tagged processes still alive ``grace`` seconds after everything was stopped (p2p
    daemons exit a moment after their agents)."""
    deadline = time.monotonic() + grace
    while (left := find_tagged_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# --- faults --------------------------------------------------------------------------------------------


@dataclass
class Provider:
    name: str
    start: int
    end: int
    agent: AgentProcess
    up: bool = True  # started and not killed, stopped or restarting


class FaultInjector(threading.Thread):
    """Does one fault after another until :meth:`finish`; then brings everything back.

    Processes are started with the kernel's parent-death signal, which follows the *thread*
    that started them: so this thread, which restarts providers and the worker, lives until
    :meth:`release`, after every process has been stopped.
    """

    def __init__(self, run: ChaosRun, kinds: list[str]) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.run_, self.kinds = run, kinds
        self.rng = random.Random(run.options.seed)
        self.faults: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.unplanned: list[dict[str, Any]] = []  # processes that exited when no fault asked them to
        self._finish, self._released, self._restored = threading.Event(), threading.Event(), threading.Event()
        self._aborted = False
        self._busy = threading.Lock()
        self._begun = threading.Event()  # until then it only watches (set-up and the reference run)

    def run(self) -> None:
        options = self.run_.options
        turn = 0
        next_fault = None
        while not self._finish.wait(0.5):
            self._watch()
            if not self._begun.is_set():
                continue
            next_fault = next_fault or time.monotonic() + options.fault_interval
            if time.monotonic() < next_fault:
                continue
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            started = time.monotonic()
            record: dict[str, Any] = {"kind": kind}
            try:
                record.update(self._do(kind))
            except Exception as e:  # noqa: BLE001 - the run reports what went wrong and goes on
                record["error"] = f"{type(e).__name__}: {e}"
                self.errors.append(f"{kind}: {record['error']}")
            record["seconds"] = round(time.monotonic() - started, 2)
            self.faults.append(record)
            self.run_.say(f"fault {len(self.faults)}: {json.dumps(record)}")
            next_fault = time.monotonic() + options.fault_interval
        try:
            if not self._aborted:
                with self._busy:
                    self.run_.restore()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"restore: {type(e).__name__}: {e}")
        finally:
            self._restored.set()
        while not self._released.wait(0.5):  # settlement needs the worker: keep watching until torn down
            self._watch()

    def _watch(self) -> None:
        """A process that exited without a fault asking for it is a finding: record it (with
        the last lines of its log) and start it again, so that the run goes on."""
        with self._busy:
            if not self._aborted:
                self._revive()

    def _revive(self) -> None:
        try:
            for name, code, log in self.run_.revive():
                record = {"process": name, "exit_code": code, "log": log}
                self.unplanned.append(record)
                self.run_.say(f"UNPLANNED EXIT: {json.dumps(record)}")
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"revive: {type(e).__name__}: {e}")

    def begin(self) -> None:
        """Start faulting (until then the thread only revives processes that died)."""
        self._begun.set()

    def kinds_done(self) -> set[str]:
        return {f["kind"] for f in self.faults}

    def finish(self, timeout: float = 300.0) -> None:
        """Stop faulting and wait until every provider and the worker run again."""
        self._finish.set()
        if not self._restored.wait(timeout):
            raise ChaosError(f"the fault thread did not bring the swarm back within {timeout:.0f} s")

    def abort(self, timeout: float = 120.0) -> None:
        """Stop faulting and reviving (everything is about to be torn down); waits for the
        fault or revival in progress to end."""
        self._aborted = True
        self._finish.set()
        self._restored.wait(timeout)
        with self._busy:  # a revival in progress ends before anything is torn down
            pass

    def release(self) -> None:
        """Let the thread end, once every process it started has been stopped."""
        self._released.set()
        self.join(30)

    def _do(self, kind: str) -> dict[str, Any]:
        run = self.run_
        if kind == "worker_restart":
            return run.restart_worker()
        if kind == "redis_restart":
            restart_redis(*run.redis)
            return {"target": f"redis:{run.redis[1]}"}
        if kind == "postgres_restart":
            restart_postgres()
            return {"target": "postgresql"}
        victim = run.pick_victim(self.rng)
        if victim is None:
            return {"target": None, "skipped": "no provider can go down while its half keeps another"}
        victim.up = False
        try:
            if kind == "provider_sigkill":
                victim.agent.process.send_signal(signal.SIGKILL)
                victim.agent.process.wait()
                time.sleep(run.options.down_s)
                run.restart_provider(victim)
            elif kind == "provider_sigstop":
                victim.agent.process.send_signal(signal.SIGSTOP)
                time.sleep(run.options.stop_s)
                victim.agent.process.send_signal(signal.SIGCONT)
            else:
                run.swarm.stop_agent(victim.agent, sig=signal.SIGTERM, timeout=15)
                run.restart_provider(victim)
        finally:
            victim.up = victim.agent.process.poll() is None
        return {"target": victim.name}


# --- the run -----------------------------------------------------------------------------------------


class ChaosRun:
    """The processes, the client and the books of one chaos run."""

    def __init__(self, options: ChaosOptions, market: LocalMarket, swarm: LocalSwarm) -> None:
        self.options, self.market, self.swarm = options, market, swarm
        self.providers: list[Provider] = []
        self.lock = threading.Lock()
        self.redis = local_service(os.environ.get("REDIS_URL", ""), ("redis",))
        self.postgres = local_service(os.environ.get("DATABASE_URL", ""), ("postgres", "postgresql", "pgsql"))
        self.model_path: Path | None = None
        self.model_id = ""
        self.provider_key = ""
        self.operator: Client | None = None
        self.client: Client | None = None
        self.runtime: Any = None
        self.expected: dict[str, Any] = {}  # prompt -> local transformers' tokens
        self.reference_losses: list[float] = []
        self.jobs: list[JobOutcome] = []
        self.planned_primaries: frozenset[str] = frozenset()  # peer ids the running job's plan uses first
        self.not_created: list[str] = []  # jobs the marketplace refused to create, and why
        self.reference_job: int | None = None
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self.options.progress(f"[{time.monotonic() - self.started:6.1f} s] {text.strip()}")

    # --- which faults ---------------------------------------------------------------------------

    def fault_kinds(self) -> tuple[list[str], dict[str, str]]:
        """The fault kinds this run does, and why each of the others is skipped."""
        kinds, skipped = ["provider_sigkill", "provider_sigstop", "provider_restart", "worker_restart"], {}
        for kind, service, what in (
            ("redis_restart", self.redis, "REDIS_URL"),
            ("postgres_restart", self.postgres, "DATABASE_URL"),
        ):
            if service is None:
                skipped[kind] = f"{what} does not name a server on this machine (embedded default or remote)"
            elif not self.options.service_faults:
                skipped[kind] = "service faults are off (--no-service-faults)"
            else:
                kinds.append(kind)
        return kinds, skipped

    # --- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from hivemart_core.models import create_model, load_model_info

        o = self.options
        path = o.home / "models" / f"chaos-llama-{o.hidden}x{o.layers}"
        if not (path / "config.json").exists():
            self.say(f"generating a llama model (hidden {o.hidden}, {o.layers} blocks) in {path}")
            create_model(path, arch="llama", hidden=o.hidden, layers=o.layers, seed=0)
        info = load_model_info(path)
        link = o.home / "models" / info.model_id  # where the scheduler's validator looks for it
        if not link.exists():
            link.symlink_to(path.name)
        self.model_path, self.model_id = path, info.model_id

        self.say(f"starting the marketplace at {self.market.url}")
        self.market.manage("migrate", "--no-input")
        operator_key = self.market.manage(
            "create_api_key", "chaos-operator", "--create", "--staff", "--name", "chaos"
        ).strip()
        self.provider_key = self.market.manage(
            "create_api_key", "chaos-provider", "--create", "--name", "chaos"
        ).strip()
        self.market.start_web()
        self.swarm.start_bootstrap()
        self.market.start_scheduler()
        self.operator = Client(api_key=operator_key, base_url=self.market.url)
        catalog_checkpoint(self.operator, path, name="Hivemart chaos llama")
        self._start_providers(info.num_blocks)
        self._fund_client()

    def _provider_args(self) -> list[str]:
        return [*market_provider_args(self.market.url, self.provider_key), "--price", str(PRICE)]

    def _start_providers(self, num_blocks: int) -> None:
        half = num_blocks // 2
        halves = [(0, half), (half, num_blocks)]
        names = [f"provider-{i}" for i in range(self.options.providers)]
        spans = [halves[i % 2] for i in range(self.options.providers)]
        self.say(
            f"starting {len(names)} providers: "
            + ", ".join(f"{n}[{s}:{e}]" for n, (s, e) in zip(names, spans, strict=False))
        )
        # All at once (start-up is mostly imports and waiting) and at one price: the plan then
        # ranks them by what the scheduler measured.
        agents = self.swarm.start_agents(self.model_path, spans, names=names, extra_args=self._provider_args())
        self.providers = [Provider(n, s, e, a) for n, (s, e), a in zip(names, spans, agents, strict=False)]
        _wait_for(lambda: self._online() >= len(self.providers), "the providers to come online", 120)

    def _online(self) -> int:
        offers = self.operator.models.offers(self.model_id)
        return len([x for x in offers if x.state == "online"])

    def _fund_client(self) -> None:
        username = f"chaos-client-{secrets.token_hex(3)}"
        anonymous = Client(base_url=self.market.url)
        signup = anonymous.accounts.signup(username=username, password=new_password())
        anonymous.close()
        self.client = Client(api_key=signup.api_key.key, base_url=self.market.url)
        self.operator.ledger.grant(username=username, amount=1000 * MICRO_PER_CREDIT, memo="chaos credits")

    # --- faults' building blocks ----------------------------------------------------------------

    def pick_victim(self, rng: random.Random) -> Provider | None:
        """A live provider whose half keeps another live provider while it is down; one the
        running job's plan uses first (a fault that no job notices proves nothing)."""
        with self.lock:
            candidates = [
                p
                for p in self.providers
                if p.up and any(q is not p and q.up and (q.start, q.end) == (p.start, p.end) for q in self.providers)
            ]
            if not candidates:
                return None
            busy = [p for p in candidates if p.agent.peer_id in self.planned_primaries]
            victim = rng.choice(busy or candidates)
            victim.up = False
            return victim

    def restart_provider(self, provider: Provider) -> None:
        provider.agent = self.swarm.start_agent(
            self.model_path, provider.start, provider.end, name=provider.name, extra_args=self._provider_args()
        )

    def _latest(self, name: str) -> MarketProcess:
        return [p for p in self.market.processes if p.name == name][-1]

    def _worker(self) -> MarketProcess:
        return self._latest("worker")

    def restart_worker(self) -> dict[str, Any]:
        """SIGKILL the Celery worker and start it again with the same command line."""
        old = self._worker()
        old.process.send_signal(signal.SIGKILL)
        old.process.wait()
        self.market.relaunch(old)
        return {"target": "worker"}

    def restore(self) -> None:
        """After the faults: every provider and the worker running (the services are restarted
        synchronously, so they run already)."""
        for provider in self.providers:
            if provider.agent.process.poll() is None:
                provider.agent.process.send_signal(signal.SIGCONT)  # harmless when it was not stopped
            else:
                self.restart_provider(provider)
            provider.up = True
        if self._worker().process.poll() is not None:
            self.market.relaunch(self._worker())

    def revive(self) -> list[tuple[str, int, str]]:
        """Start again every provider that should run and every marketplace process that
        exited; returns (name, exit code, last log lines) of each."""
        revived = []
        for provider in self.providers:
            if provider.up and provider.agent.process.poll() is not None:
                revived.append((provider.name, provider.agent.process.returncode, _last_lines(provider.agent.log_path)))
                self.restart_provider(provider)
        for name in ("web", "worker", "beat"):
            entry = self._latest(name)
            if entry.process.poll() is not None:
                revived.append((name, entry.process.returncode, _last_lines(entry.log_path)))
                self.market.relaunch(entry)
        return revived

    # --- the client -----------------------------------------------------------------------------

    def open_runtime(self) -> None:
        from hivemart_core.swarm.runtime import SwarmRuntime

        self.runtime = SwarmRuntime(self.swarm.initial_peers)

    def _model(self) -> Any:
        from client_sdk.swarm.model import DistributedModelForCausalLM

        # A fresh model per job: each job starts without the bans the previous one collected.
        return DistributedModelForCausalLM.from_pretrained(self.model_path, runtime=self.runtime)

    def compute_expected(self) -> None:
        """Local transformers' greedy tokens for every prompt: what each inference job must produce."""
        import torch
        from transformers import AutoModelForCausalLM

        from hivemart_core.models import load_tokenizer

        tokenizer = load_tokenizer(self.model_path)
        local = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                tokens = local.generate(
                    ids, max_new_tokens=self.options.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
                )
            self.expected[prompt] = (ids, tokens)

    def _train_config(self) -> Any:
        from client_sdk.finetune import TrainConfig

        return TrainConfig(mode="lora", steps=self.options.lora_steps, lr=1e-2, batch_size=2, seq_len=16, rank=4)

    def run_reference(self) -> None:
        """The LoRA job's losses without faults: what every LoRA job under faults must reproduce."""
        outcome, losses = self._lora_job(reference=True)
        if outcome.reason:
            raise ChaosError(f"the fault-free reference LoRA job {outcome.job_id} failed: {outcome.reason}")
        self.reference_job, self.reference_losses = outcome.job_id, losses

    def _create(self, kind: str, budget: int) -> JobOutcome:
        """Create a job (its hold placed); :class:`JobNotCreated` when the marketplace refused."""
        from hivemart_core.protocol.identity import Identity

        identity = Identity.generate()
        try:
            row = self.client.jobs.create(
                model=self.model_id, kind=kind, budget=budget, max_price=2_000_000, client_key=identity.public_key
            )
        except Exception as e:  # noqa: BLE001
            raise JobNotCreated(f"{type(e).__name__}: {e}") from e
        outcome = JobOutcome(row.id, kind)
        outcome.detail["identity"] = identity
        return outcome

    def _open(self, outcome: JobOutcome) -> Any:
        from client_sdk.swarm.job import MarketJob

        job = MarketJob.open(self.client, outcome.job_id, outcome.detail.pop("identity"), verify_rate=0.0)
        self.planned_primaries = frozenset(segment[0].peer_id for segment in job.plan.segments)
        return job

    def inference_job(self, index: int) -> JobOutcome:
        prompt = PROMPTS[index % len(PROMPTS)]
        ids, expected = self.expected[prompt]
        outcome = self._create("inference", 10 * MICRO_PER_CREDIT)
        job = None
        try:
            job = self._open(outcome)
            model = self._model()
            job.attach(model)
            with model.inference_session(max_length=ids.shape[1] + self.options.new_tokens) as session:
                tokens = model.generate(ids, max_new_tokens=self.options.new_tokens, session=session)
                outcome.detail["failovers"] = len(session.chain.failovers)
            outcome.exact = bool(tokens.shape == expected.shape and (tokens == expected).all())
            if not outcome.exact:
                outcome.detail["mismatch"] = "tokens differ from local transformers' greedy generation"
            self._finish(job, outcome)
        except Exception as e:  # noqa: BLE001 - any failure of a job under faults is what the run reports
            self._fail(job, outcome, e)
        return outcome

    def lora_job(self, index: int) -> JobOutcome:
        return self._lora_job(reference=False)[0]

    def _lora_job(self, *, reference: bool) -> tuple[JobOutcome, list[float]]:
        from client_sdk.finetune import FineTuner
        from client_sdk.finetune.data import PackedDataset
        from hivemart_core.models import load_tokenizer

        config = self._train_config()
        outcome = self._create("finetune", 20 * MICRO_PER_CREDIT)
        losses: list[float] = []
        job = None
        try:
            job = self._open(outcome)
            model = self._model()
            job.attach(model)
            dataset = PackedDataset.from_texts(FINETUNE_TEXTS * 4, load_tokenizer(self.model_path), config.seq_len)
            tuner = FineTuner(model, config)
            try:
                losses = tuner.fit(dataset, progress=False).losses
            finally:
                _close_quietly(tuner, outcome)
            if not reference:
                outcome.exact = _losses_match(losses, self.reference_losses)
                if not outcome.exact:
                    outcome.detail.update(
                        mismatch="losses differ from the fault-free run's",
                        losses=losses,
                        reference=self.reference_losses,
                    )
            self._finish(job, outcome)
        except Exception as e:  # noqa: BLE001
            self._fail(job, outcome, e)
        return outcome, losses

    def _finish(self, job: Any, outcome: JobOutcome) -> None:
        summary = job.finish()
        outcome.detail["receipts"] = summary["receipts"]["countersigned"]

    def _fail(self, job: Any, outcome: JobOutcome, error: Exception) -> None:
        """The job failed: upload the receipts it countersigned and cancel it with the reason
        (which settles that work and returns the rest of the hold)."""
        outcome.exact = False
        outcome.detail.pop("identity", None)
        outcome.reason = f"{type(error).__name__}: {error}".strip()[:500]
        self.say(f"job {outcome.job_id} ({outcome.kind}) failed: {outcome.reason}")
        if job is not None:
            job.detach()
            try:
                job.collector.close()
            except Exception as e:  # noqa: BLE001 - the cancel below still returns the hold
                outcome.detail["upload_error"] = f"{type(e).__name__}: {e}"
        try:
            self.client.jobs.cancel(outcome.job_id, reason=f"chaos: {outcome.reason}"[:200])
        except Exception as e:  # noqa: BLE001 - e.g. finish() failed after moving it to settling
            outcome.detail["cancel_error"] = f"{type(e).__name__}: {e}"

    # --- the books ------------------------------------------------------------------------------

    def books(self) -> dict[str, Any]:
        return json.loads(self.market.manage("verify_ledger", "--json"))

    def wallet(self) -> int:
        return self.client.accounts.me().wallet_balance

    def settle(self, job_ids: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Wait until every job is in a final state with its hold closed; returns each one's
        state, hold and the reason of its last transition."""

        def states() -> dict[int, Any]:
            return {job_id: self.client.jobs.get(job_id) for job_id in job_ids}

        try:
            _wait_for(
                lambda: all(
                    j.state in _TERMINAL and (j.hold is None or j.hold.state == "closed") for j in states().values()
                ),
                "the jobs to be settled",
                timeout,
                interval=1.0,
            )
        except ChaosError as e:
            self.say(f"{e}")
        found = {}
        for job_id, job in states().items():
            transitions = self.client.jobs.transitions(job_id)
            found[job_id] = {
                "state": job.state,
                "hold_state": job.hold.state if job.hold else None,
                "hold_left": job.hold.left if job.hold else 0,
                "reason": transitions[-1].reason if transitions else "",
            }
        return found

    def close(self) -> None:
        for close in (
            getattr(self.runtime, "shutdown", None),
            getattr(self.client, "close", None),
            getattr(self.operator, "close", None),
        ):
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing what is left; the report is what matters
                    pass


def _last_lines(path: Path, lines: int = 6) -> str:
    return log_tail(path, lines)[-1500:]


def _close_quietly(tuner: Any, outcome: JobOutcome) -> None:
    """Release the job's adapters on its providers; a failure here must not hide the job's own."""
    try:
        tuner.close()
    except Exception as e:  # noqa: BLE001
        outcome.detail["adapter_release_error"] = f"{type(e).__name__}: {e}"


def _losses_match(losses: list[float], reference: list[float]) -> bool:
    return len(losses) == len(reference) and all(
        math.isclose(a, b, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL) for a, b in zip(losses, reference, strict=False)
    )


def _jobs(
    run: ChaosRun, injector: FaultInjector, kinds: list[str], deadline: float, max_jobs: int
) -> Iterator[JobOutcome]:
    """Inference and LoRA jobs in turn until the deadline has passed and every fault kind ran
    once (or ``max_jobs`` ran)."""
    index = 0
    # Past the deadline, jobs go on until every fault kind had its turn, but not for ever.
    hard_stop = deadline + 600

    def more() -> bool:
        now = time.monotonic()
        return index < max_jobs and now < hard_stop and (now < deadline or not set(kinds) <= injector.kinds_done())

    while more():
        try:
            outcome = run.inference_job(index // 2) if index % 2 == 0 else run.lora_job(index // 2)
        except JobNotCreated as e:
            run.not_created.append(str(e))
            run.say(f"a job could not be created: {e}")
            time.sleep(1.0)
            continue
        finally:
            index += 1
        verdict = "exact" if outcome.exact else outcome.reason or "INEXACT: " + outcome.detail.get("mismatch", "")
        run.say(f"job {outcome.job_id} ({outcome.kind}): {verdict}")
        yield outcome


def run_chaos(options: ChaosOptions, *, max_jobs: int = 1000) -> dict[str, Any]:
    """Set up, run jobs under faults, wind down, and return the report (see the module docstring)."""
    if options.providers < 4:
        raise ChaosError("a chaos run needs at least 4 providers (two per half of the model, so that one may fail)")
    run_id = secrets.token_hex(8)
    _sigterm_as_interrupt()  # so that `timeout` or a service manager stopping the run still cleans up
    previous = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = run_id  # inherited by every process started from here on
    options.home = Path(options.home).resolve()
    options.home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        report = _run(options, max_jobs)
    finally:
        if previous is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = previous
    orphans = _count_orphans(run_id)
    report.update(orphans=len(orphans), seconds=round(time.monotonic() - started, 1))
    if orphans:
        report["orphan_pids"] = orphans
    return report


def _sigterm_as_interrupt() -> None:
    if threading.current_thread() is threading.main_thread():

        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def _run(options: ChaosOptions, max_jobs: int) -> dict[str, Any]:
    market = LocalMarket(options.home, extra_env=market_env())
    # Restarts happen while jobs run on a busy machine: give agents time to come up.
    swarm = LocalSwarm(workdir=options.home / "swarm", startup_timeout=300.0)
    run = ChaosRun(options, market, swarm)
    injector: FaultInjector | None = None
    try:
        run.setup()
        kinds, skipped = run.fault_kinds()
        injector = FaultInjector(run, kinds)
        injector.start()
        run.open_runtime()
        run.say("computing the fault-free outputs: local generation and a reference LoRA job")
        run.compute_expected()
        wallet_before = run.wallet()
        books_before = run.books()["balances_by_kind"]
        run.run_reference()
        run.say(f"running jobs under faults for {options.minutes:g} min: {', '.join(kinds)}")
        chaos_started = time.monotonic()
        injector.begin()
        run.jobs = list(_jobs(run, injector, kinds, chaos_started + options.minutes * 60, max_jobs))
        chaos_seconds = time.monotonic() - chaos_started
        run.say("faults over: bringing every provider and the worker back, waiting for settlement")
        injector.finish()
        job_ids = [j.job_id for j in run.jobs] + ([run.reference_job] if run.reference_job else [])
        settled = run.settle(job_ids, timeout=120)
        books = run.books()
        spent = wallet_before - run.wallet()
        after = books["balances_by_kind"]
        delta = {kind: after.get(kind, 0) - books_before.get(kind, 0) for kind in ("earnings", "fees", "escrow")}
        return _report(run, injector, kinds, skipped, settled, books, spent, delta, chaos_seconds)
    finally:
        if injector is not None:
            injector.abort()  # a no-op when it has finished already
        run.close()
        swarm.stop()
        market.stop()
        if injector is not None:
            injector.release()


def _report(
    run: ChaosRun,
    injector: FaultInjector,
    kinds: list[str],
    skipped: dict[str, str],
    settled: dict[int, dict[str, Any]],
    books: dict[str, Any],
    spent: int,
    delta: dict[str, int],
    chaos_seconds: float,
) -> dict[str, Any]:
    by_kind = {kind: 0 for kind in kinds}
    for fault in injector.faults:
        if "error" not in fault and fault.get("target", "") is not None:
            by_kind[fault["kind"]] += 1

    def is_settled(job_id: int) -> bool:
        s = settled[job_id]
        return s["state"] in _TERMINAL and s["hold_state"] in ("closed", None) and s["hold_left"] == 0

    failed = [j for j in run.jobs if j.reason]
    for job in failed:
        job.detail["final_state"] = settled[job.job_id]["state"]
    return {
        "jobs": len(run.jobs),
        "jobs_exact": sum(j.exact for j in run.jobs),
        "jobs_failed": len(failed),
        "jobs_inexact": sum(1 for j in run.jobs if not j.exact and not j.reason),
        "jobs_settled": sum(is_settled(j.job_id) for j in run.jobs),
        "jobs_by_kind": {kind: sum(j.kind == kind for j in run.jobs) for kind in ("inference", "finetune")},
        # Hops an inference job replaced on the way (LoRA jobs re-route per request, uncounted).
        "failovers": sum(j.detail.get("failovers", 0) for j in run.jobs),
        "faults": sum(by_kind.values()),
        "faults_by_kind": by_kind,
        "fault_kinds": kinds,
        "fault_kinds_skipped": skipped,
        "fault_errors": injector.errors,
        # Processes that exited although no fault asked them to (each was started again).
        "unplanned_exits": injector.unplanned,
        "ledger_consistent": bool(books["consistent"]),
        "client_spent": spent,
        "providers_earned": delta["earnings"],
        "fees": delta["fees"],
        # What left the client's wallet and reached neither a provider nor the platform: a hold
        # not returned (still in escrow) or credits that vanished.
        "credits_lost": spent - delta["earnings"] - delta["fees"],
        "jobs_not_created": run.not_created,
        "reference_settled": run.reference_job is None or is_settled(run.reference_job),
        "failures": [j.to_dict() for j in run.jobs if not j.exact],
        "chaos_seconds": round(chaos_seconds, 1),
    }
