"""The marketplace's processes on this machine: migrate, web server, scheduler worker and beat.

Used by ``hivemart demo``. Everything runs as subprocesses of the console scripts a real
deployment uses (``hivemart-market ...``, gunicorn), configured only through environment
variables, so the demo exercises the same code paths as production. With ``DATABASE_URL``
and ``REDIS_URL`` unset they use SQLite and the embedded filesystem broker under the data
directory. Each child gets the kernel's parent-death signal, and :meth:`LocalMarket.stop`
stops them cleanly (SIGTERM, then SIGKILL after a grace period), so none outlives the demo.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from client_sdk.processes import log_tail, stop_processes
from hivemart_core.errors import HivemartError
from hivemart_core.swarm.p2p import die_with_parent

__all__ = ["LocalMarket", "MarketProcess", "StackError", "free_port"]


class StackError(HivemartError):
    """A marketplace process did not start; the message names its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MarketProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log_path, lines)


@dataclass
class LocalMarket:
    """``with LocalMarket(home) as market: market.start(); market.url ...``"""

    home: Path
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[MarketProcess] = field(default_factory=list)
    startup_timeout: float = 90.0

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def env(self) -> dict[str, str]:
        """The environment every marketplace process runs with."""
        env = {
            **os.environ,
            "HIVEMART_HOME": str(self.home),
            "DJANGO_SETTINGS_MODULE": "marketplace.settings",
            "SECRET_KEY": self._secret_key(),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "HIVEMART_MODELS_DIR": str(self.home / "models"),
            "PYTHONUNBUFFERED": "1",
            # Plain HTTP on loopback: no redirect to https, no Secure-only cookies.
            "HIVEMART_HTTPS": "false",
        }
        env.update(self.extra_env)
        return env

    def _secret_key(self) -> str:
        # Kept in the data directory so that web sessions survive a restart of the demo.
        path = self.home / "secret_key"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
        return path.read_text().strip()

    def manage(self, *args: str, timeout: float = 300.0) -> str:
        """Run one ``hivemart-market`` command to completion and return its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "marketplace.manage", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        if result.returncode != 0:
            raise StackError(
                f"`hivemart-market {' '.join(args)}` failed ({result.returncode}):\n"
                f"{(result.stderr or result.stdout)[-3000:]}"
            )
        return result.stdout

    def _launch(self, name: str, argv: Sequence[str]) -> MarketProcess:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                cwd=self.home,
            )
        entry = MarketProcess(name, process, log_path)
        self.processes.append(entry)
        return entry

    def start_web(self, *, workers: int = 2) -> MarketProcess:
        """gunicorn serving the marketplace (API, web pages, admin); waits for ``/healthz``."""
        web = self._launch(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "marketplace.wsgi:application",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--timeout",
                "120",
                "--graceful-timeout",
                "5",
                # gunicorn's own limit answers in HTML: let URLs up to its maximum
                # reach the app, whose 414 is the API's JSON error
                "--limit-request-line",
                "8190",
                "--access-logfile",
                "-",
            ],
        )
        self._wait_http(web, f"{self.url}/healthz")
        return web

    def start_scheduler(self) -> tuple[MarketProcess, MarketProcess]:
        """A Celery worker (one process, so it stops as one) and beat, the periodic tasks' clock."""
        worker = self._launch(
            "worker",
            [
                sys.executable,
                "-m",
                "marketplace.manage",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        beat = self._launch(
            "beat",
            [sys.executable, "-m", "marketplace.manage", "beat", "--schedule", str(self.home / "celerybeat-schedule")],
        )
        self._wait_log(worker, "ready")
        return worker, beat

    def _wait_http(self, entry: MarketProcess, url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if entry.process.poll() is not None:
                raise StackError(
                    f"{entry.name} exited ({entry.process.returncode}); see {entry.log_path}:\n{entry.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"{entry.name} did not answer {url} within {self.startup_timeout:.0f} s; see {entry.log_path}"
                )
            time.sleep(0.2)

    def relaunch(self, old: MarketProcess) -> MarketProcess:
        """Start ``old``'s command line again (after it exited or was killed) under the same
        name and log, and wait until it is ready as :meth:`start_web`/:meth:`start_scheduler` do."""
        offset = old.log_path.stat().st_size if old.log_path.exists() else 0
        entry = self._launch(old.name, old.process.args)
        if old.name == "web":
            self._wait_http(entry, f"{self.url}/healthz")
        elif old.name == "worker":
            self._wait_log(entry, "ready", offset=offset)
        return entry

    def _wait_log(self, entry: MarketProcess, marker: str, *, offset: int = 0) -> None:
        """Wait for ``marker`` in the log written after byte ``offset`` (a relaunch appends)."""
        deadline = time.monotonic() + self.startup_timeout
        while marker.encode() not in _read_from(entry.log_path, offset):
            if entry.process.poll() is not None:
                raise StackError(
                    f"{entry.name} exited ({entry.process.returncode}); see {entry.log_path}:\n{entry.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{entry.name} was not ready within {self.startup_timeout:.0f} s; see {entry.log_path}"
                )
            time.sleep(0.2)

    def alive(self) -> bool:
        return all(p.process.poll() is None for p in self.processes)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process, newest first; SIGKILL what is still running after ``grace``."""
        stop_processes([entry.process for entry in reversed(self.processes)], grace=grace)

    def __enter__(self) -> LocalMarket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def market_provider_args(market_url: str, provider_key: str, *, heartbeat_period: int = 2) -> list[str]:
    """``hivemart-provider run`` arguments for an agent selling through a local marketplace at
    demo pace: heartbeats every ``heartbeat_period`` s (the market's HIVEMART_HEARTBEAT_PERIOD_S;
    the demo's market marks a provider offline after three), receipts uploaded every second and
    signed every 4 steps."""
    return [
        *("--market", market_url, "--api-key", provider_key),
        *("--heartbeat-period", str(heartbeat_period), "--upload-period", "1", "--receipt-every", "4"),
    ]


def catalog_checkpoint(operator: Any, path: Path, *, name: str) -> None:
    """Add the checkpoint at ``path`` to the catalog through ``operator`` (a staff
    :class:`~hivemart_core.api.Client`); already catalogued (an earlier run in the same data
    directory) is fine."""
    from hivemart_core.errors import ConflictError
    from hivemart_core.models import compute_digests, load_model_info

    info = load_model_info(path)
    digests = compute_digests(path)
    try:
        operator.models.create(
            model_id=info.model_id,
            arch=info.arch,
            num_blocks=info.num_blocks,
            hidden_size=info.hidden_size,
            dtype=info.torch_dtype,
            weights_digest=digests["model"],
            block_digests=digests["blocks"],
            client_digest=digests["client"],
            name=name,
        )
    except ConflictError:
        pass
