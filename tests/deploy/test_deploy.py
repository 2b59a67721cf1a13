"""deploy/: the compose file's structure, the Dockerfiles, the systemd units and the example env
files; then the web service's own start command (read from compose.yaml) run for real against
PostgreSQL and Redis. Docker itself is not needed.

``compose-spec.json`` beside this file is the Compose Specification's JSON schema
(github.com/compose-spec/compose-spec, ``schema/compose-spec.json``, Apache-2.0), kept here so
the file is checked against the format Docker Compose reads without Docker or a network.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
HIVEMART_SERVICES = {"migrate", "web", "worker", "beat", "dht", "gateway"}
# Startup waits (a loaded CI machine may be slow); not assertions about speed.
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def env_names(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    names = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not NAME=value"
            names[name] = value
    return names


def settings_read() -> set[str]:
    """Every environment variable marketplace/settings.py reads."""
    source = (ROOT / "marketplace" / "settings.py").read_text()
    return set(
        re.findall(r'(?:env_int|env_bool|env_list|os\.environ\.get|os\.environ\.setdefault)\(\s*"([A-Z0-9_]+)"', source)
    )


def console_scripts() -> set[str]:
    return {e.name for e in entry_points(group="console_scripts")}


def check_command(argv: list[str]) -> None:
    """``argv`` runs a real program: a console script, and for ours a real subcommand with real options."""
    program = Path(argv[0]).name
    assert program in console_scripts(), f"{program} is not an installed console script"
    if program == "hivemart-market":
        from django.core.management import get_commands

        assert argv[1] in get_commands(), f"hivemart-market has no command {argv[1]!r}"
    elif program == "hivemart-provider":
        from provider_agent.cli import cli

        args = [a for a in argv[1:] if a not in ("-v", "-vv")]
        command = cli.commands.get(args[0])
        assert command is not None, f"hivemart-provider has no command {args[0]!r}"
        known = {opt for p in command.params for opt in p.opts}
        flags = [a for a in args[1:] if a.startswith("--")]
        assert flags and set(flags) <= known, f"unknown options for hivemart-provider {args[0]}: {set(flags) - known}"
    elif program == "hivemart":
        from hivemart.cli import cli as hivemart_cli

        command = hivemart_cli.commands.get(argv[1])
        assert command is not None, f"hivemart has no command {argv[1]!r}"
        known = {opt for p in command.params for opt in p.opts}
        flags = [a for a in argv[2:] if a.startswith("--")]
        assert set(flags) <= known, f"unknown options for hivemart {argv[1]}: {set(flags) - known}"
    elif program == "gunicorn":
        module, _, attr = argv[1].partition(":")
        imported = __import__(module, fromlist=[attr or "application"])
        assert callable(getattr(imported, attr or "application")), f"{argv[1]} is not a WSGI application"


# --- compose.yaml ---------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose)
    ]
    assert not errors, errors


def test_compose_has_every_service(compose: dict) -> None:
    assert set(compose["services"]) == {"postgres", "redis", *HIVEMART_SERVICES}
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    assert compose["services"]["redis"]["image"].startswith("redis:")
    assert set(compose["volumes"]) >= {"postgres-data", "redis-data", "hivemart-home"}


def test_hivemart_services_share_one_image_and_the_env_file(compose: dict) -> None:
    for name in HIVEMART_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        assert service["image"] == "hivemart:latest", name
        assert service["env_file"] == ["hivemart.env"], name
        assert "hivemart-home:/var/lib/hivemart" in service["volumes"], name
        assert isinstance(service["command"], list), f"{name}: exec form, so signals reach the process"
    # The env file is made from the committed example; postgres reads the same one.
    assert (DEPLOY / "hivemart.env.example").is_file()
    assert compose["services"]["postgres"]["env_file"] == ["hivemart.env"]


def test_dependencies_wait_for_health_and_migrations(compose: dict) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        assert deps["redis"] == {"condition": "service_healthy"}, name
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which it never reports"


def test_long_running_services_have_healthchecks(compose: dict) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "web", "worker", "dht", "gateway"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert "8080/healthz" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert "--ready-file" in services["dht"]["command"]
    ready = services["dht"]["command"][services["dht"]["command"].index("--ready-file") + 1]
    assert ready in services["dht"]["healthcheck"]["test"]


@pytest.mark.parametrize("name", sorted(HIVEMART_SERVICES))
def test_commands_run_real_programs(compose: dict, name: str) -> None:
    check_command(compose["services"][name]["command"])


def test_worker_healthcheck_pings_the_scheduler_app(compose: dict) -> None:
    test = compose["services"]["worker"]["healthcheck"]["test"][1]
    argv = shlex.split(test)
    assert argv[0] in console_scripts() and argv[1:3] == ["-A", "scheduler"]


def test_env_example_lists_every_setting(compose: dict) -> None:
    example = env_names(DEPLOY / "hivemart.env.example")
    missing = settings_read() - set(example)
    assert not missing, f"deploy/hivemart.env.example lacks {sorted(missing)} (read in marketplace/settings.py)"
    # The postgres service's own variables, which its healthcheck uses too.
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(example)
    assert example["DEBUG"] == "false"
    assert example["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in example["DATABASE_URL"]
    assert example["REDIS_URL"].startswith("redis://redis:6379/")


# --- Dockerfiles and systemd units ----------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.provider"])
def test_dockerfiles_install_the_pinned_package(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "-c constraints.txt" in text
    for package in ("hivemart_core", "client_sdk", "provider_agent", "marketplace", "scheduler", "hivemart"):
        assert f"COPY {package} ./{package}" in text and (ROOT / package).is_dir()
    assert re.search(r"^USER hivemart$", text, re.M), "processes do not run as root"
    # The build context is the repository root; the ignore file keeps .venv and the like out.
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] and "!marketplace/" in ignore


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


@pytest.mark.parametrize("name", ["hivemart-provider.service", "hivemart-dht.service"])
def test_systemd_units_run_real_commands(name: str) -> None:
    service = unit(name)["Service"]
    argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert argv[0].startswith("/opt/hivemart/.venv/bin/")
    check_command(argv)
    assert service["User"] == "hivemart" and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"
    # Peers cost file descriptors: far above systemd's default of 1,024 (issue 14, slowloris).
    assert int(service["LimitNOFILE"]) >= 65536


def test_provider_unit_variables_come_from_the_example_env() -> None:
    service = unit("hivemart-provider.service")["Service"]
    assert service["EnvironmentFile"] == "/etc/hivemart/provider.env"
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", service["ExecStart"]))
    example = env_names(DEPLOY / "provider.env.example")
    assert used <= set(example), f"provider.env.example lacks {used - set(example)}"
    # What the agent reads from the environment by itself must be there too.
    assert {"HIVEMART_MARKET", "HIVEMART_API_KEY", "HIVEMART_MODEL", "HIVEMART_INITIAL_PEERS"} <= set(example)
    assert all(example[name] for name in used), "every variable the unit passes has a value"


# --- the web service, for real ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``DATABASE_URL``; dropped afterwards."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this against PostgreSQL (DATABASE_URL=postgres://...)")
        pytest.skip("needs PostgreSQL: set DATABASE_URL=postgres://... (scripts/test does)")
    import dj_database_url
    import psycopg

    params = dj_database_url.parse(url)
    name = f"hivemart_deploy_{uuid.uuid4().hex[:10]}"
    connect = dict(
        host=params["HOST"] or "127.0.0.1",
        port=params["PORT"] or 5432,
        user=params["USER"] or None,
        password=params["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )
    with psycopg.connect(**connect) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    netloc = url.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgres://{netloc}/{name}"
    finally:
        with psycopg.connect(**connect) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this against Redis (REDIS_URL=redis://...)")
        pytest.skip("needs Redis: set REDIS_URL=redis://127.0.0.1:6379/0 (scripts/test does)")
    return url


def with_bind(argv: list[str], address: str) -> list[str]:
    """The compose command with gunicorn's ``--bind`` pointed at ``address`` (the one change made)."""
    assert argv.count("--bind") == 1
    argv = list(argv)
    argv[argv.index("--bind") + 1] = address
    return argv


def resolve(argv: list[str]) -> list[str]:
    """Console scripts from this environment's bin directory (the image has them on PATH)."""
    return [str(BIN / argv[0]), *argv[1:]]


def wait_healthy(url: str, proc: subprocess.Popen) -> httpx.Response:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | httpx.Response | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the web service exited with {proc.returncode} before it was healthy")
        try:
            last = httpx.get(url, timeout=5)
            if last.status_code == 200:
                return last
        except httpx.TransportError as e:
            last = e
        time.sleep(0.5)
    pytest.fail(f"{url} not healthy after {START_TIMEOUT_S} s: {last!r}")


def hivemart_env(database_url: str, redis_url: str, home: Path) -> dict[str, str]:
    """The environment a compose service gets from hivemart.env, pointed at the test's services."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": "deploy-test-only-not-a-secret",
        "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "HIVEMART_HOME": str(home),
        # A queue of its own, so that nothing else on this Redis takes the test's tasks.
        "HIVEMART_CELERY_QUEUE": f"deploy-test-{uuid.uuid4().hex[:8]}",
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
    }


def container_path(argv: list[str], home: Path) -> list[str]:
    """``argv`` with the image's HIVEMART_HOME (/var/lib/hivemart) mapped to ``home``."""
    return [a.replace("/var/lib/hivemart", str(home)) for a in argv]


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM (what `docker compose stop` sends), then the exit status; SIGKILL the group if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise


@pytest.mark.slow
def test_worker_and_beat_commands_run_against_redis(
    compose: dict, fresh_database: str, redis_url: str, tmp_path: Path
) -> None:
    """The worker answers the compose healthcheck's ping, beat writes its schedule into the home
    volume, and both stop on SIGTERM without leaving children behind."""
    home = tmp_path / "home"
    home.mkdir()  # the image creates /var/lib/hivemart; nothing else exists in a fresh volume
    env = hivemart_env(fresh_database, redis_url, home)
    services = compose["services"]
    migrate = subprocess.run(
        resolve(services["migrate"]["command"]), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    procs: dict[str, subprocess.Popen] = {}
    children: list[psutil.Process] = []
    try:
        for name in ("worker", "beat"):
            log = (tmp_path / f"{name}.log").open("w")
            procs[name] = subprocess.Popen(
                resolve(container_path(services[name]["command"], home)),
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The worker's healthcheck, exactly as compose runs it (with $$ unescaped and HOSTNAME set).
        check = services["worker"]["healthcheck"]["test"][1].replace("$$", "$")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
            ping = subprocess.run(
                ["sh", "-c", check],
                env={**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "HOSTNAME": socket.gethostname()},
                capture_output=True,
                text=True,
                timeout=60,
            )
            if ping.returncode == 0:
                break
            assert time.monotonic() < deadline, f"the worker never answered its healthcheck: {ping.stdout}"
            time.sleep(1)
        assert "pong" in ping.stdout
        deadline = time.monotonic() + START_TIMEOUT_S
        while not list(home.glob("beat-schedule*")):
            assert procs["beat"].poll() is None, (tmp_path / "beat.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "beat never wrote its schedule"
            time.sleep(0.5)
        children = [c for p in procs.values() for c in psutil.Process(p.pid).children(recursive=True)]
        for name, proc in procs.items():
            assert stop(proc) == 0, f"{name}: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned processes: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_dht_command_becomes_healthy_and_stops(compose: dict, tmp_path: Path) -> None:
    """The bootstrap node's compose command (on a free port, paths under tmp_path) passes its
    healthcheck, keeps its identity across restarts, and stops on SIGTERM."""
    service = compose["services"]["dht"]
    home = tmp_path / "home"
    home.mkdir()
    ready = tmp_path / "dht.ready"
    argv = [
        a.replace("/tmp/dht.ready", str(ready)).replace("/tcp/31337", "/tcp/0")
        for a in container_path(service["command"], home)
    ]
    check = [a.replace("/tmp/dht.ready", str(ready)) for a in service["healthcheck"]["test"][1:]]
    peer_ids = []
    for _ in range(2):
        ready.unlink(missing_ok=True)
        log = tmp_path / "dht.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                resolve(argv), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while subprocess.run(check).returncode != 0:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the DHT node never became healthy"
                time.sleep(0.5)
            peer_ids.append(re.search(r"/p2p/(\w+)", ready.read_text()).group(1))
            children = psutil.Process(proc.pid).children(recursive=True)  # the p2p daemon
            assert stop(proc) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"orphaned processes: {[p.pid for p in alive]}"
    assert peer_ids[0] == peer_ids[1], "the identity file keeps the peer id (and so every provider's config) stable"
    assert (home / "dht.key").exists()


@pytest.mark.slow
def test_web_service_start_command_serves_against_postgres_and_redis(
    compose: dict, fresh_database: str, redis_url: str, tmp_path: Path
) -> None:
    env = hivemart_env(fresh_database, redis_url, tmp_path / "home")
    services = compose["services"]
    migrate = subprocess.run(
        resolve(services["migrate"]["command"]), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    port = free_port()
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        resolve(with_bind(services["web"]["command"], f"127.0.0.1:{port}")),
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workers: list[psutil.Process] = []
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        assert health.json()["checks"]["database"] == {"ok": True, "detail": "postgresql"}
        assert health.json()["checks"]["broker"]["ok"] is True
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "gunicorn forked its workers"

        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "Hivemart" in page.text
        css = httpx.get(f"http://127.0.0.1:{port}/static/web/hivemart.css", timeout=10)
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        # The API answers too, in its own error shape (no key given).
        api = httpx.get(f"http://127.0.0.1:{port}/api/models/", timeout=10)
        assert api.status_code in (401, 403) and api.json()["code"] in ("unauthenticated", "permission_denied")

        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    # Gunicorn stopped its workers with it: nothing is left behind.
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
