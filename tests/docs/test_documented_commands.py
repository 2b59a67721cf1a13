"""Every command README.md and docs/ show is checked one way or another (the list and its
reasons: ``tests/docs/documented_commands.py``); here, the list against the docs, and what can
be checked without running anything: the programs, subcommands and options exist."""

from __future__ import annotations

import json
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest

from tests.docs.commands import ROOT, documented_commands
from tests.docs.documented_commands import COMMANDS, DEMO, HELP, HOST, RUN

_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def test_the_list_names_exactly_the_commands_in_the_docs() -> None:
    documented = documented_commands()
    missing = sorted(set(documented) - set(COMMANDS))
    stale = sorted(set(COMMANDS) - set(documented))
    assert not missing, f"commands in the docs with no entry in tests/docs/documented_commands.py: {missing}"
    assert not stale, f"entries in tests/docs/documented_commands.py no document shows any more: {stale}"


def test_every_command_not_run_says_why() -> None:
    for command, (how, reason) in COMMANDS.items():
        assert how in (RUN, DEMO, HELP, HOST), command
        assert how in (RUN, DEMO) or len(reason) > 10, f"say why {command!r} is not run"


def _program(words: list[str]) -> tuple[str, list[str]]:
    program = words[0].removeprefix(".venv/bin/")
    return program, words[1:]


def _click_command(program: str) -> click.Command:
    if program == "hivemart":
        from hivemart.cli import cli

        return cli
    from provider_agent.cli import cli as provider_cli

    return provider_cli


def _click_options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]} | {"--help", "-h"}


def _check_click(program: str, args: list[str], text: str) -> None:
    command = _click_command(program)
    known = _click_options(command)
    for word in args:
        if word.startswith("-"):
            continue
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            known |= _click_options(command)
        elif isinstance(command, click.Group):
            raise AssertionError(f"{text!r}: `{program}` has no subcommand {word!r}")
    assert not isinstance(command, click.Group), f"{text!r} names a group of commands, not a command"
    unknown = sorted(set(_OPTION.findall(text.split(" ", 1)[1] if " " in text else "")) - known)
    assert not unknown, f"{text!r}: {program} does not take {unknown}"


def _check_manage(args: list[str], text: str) -> None:
    from django.core.management import get_commands, load_command_class

    name = args[0]
    commands = get_commands()
    assert name in commands, f"{text!r}: hivemart-market has no command {name!r}"
    parser = load_command_class(commands[name], name).create_parser("hivemart-market", name)
    known = set(parser._option_string_actions)  # noqa: SLF001 - argparse keeps them only here
    if name in ("worker", "beat"):  # these pass their options through to Celery
        return
    unknown = sorted(set(_OPTION.findall(" ".join(args[1:]))) - known)
    assert not unknown, f"{text!r}: hivemart-market {name} does not take {unknown}"


@pytest.mark.parametrize("text", sorted(c for c, (how, _) in COMMANDS.items() if how in (HELP, RUN, DEMO)))
def test_programs_subcommands_and_options_exist(text: str) -> None:
    words = shlex.split(text.replace("\\|", " "))
    if words[0] in ("printf",):
        return
    program, args = _program(words)
    if program == "hivemart-market":
        _check_manage(args, text)
    else:
        assert program in ("hivemart", "hivemart-provider"), text
        _check_click(program, args, text)


_REPO_PATH = re.compile(r"^(?:\./)?(?:deploy|scripts|docs)/[\w./-]+$|^constraints\.txt$")


@pytest.mark.parametrize("text", sorted(c for c, (how, _) in COMMANDS.items() if how == HOST))
def test_host_commands_name_files_that_exist(text: str) -> None:
    words = shlex.split(text) if "'" not in text else text.split()
    for word in words:
        if _REPO_PATH.match(word) and not word.endswith("hivemart.env"):  # the copy it makes
            assert (ROOT / word).exists(), f"{text!r} names {word}, which does not exist"
    if text.startswith("export HIVEMART_API_KEY"):
        from provider_agent.cli import cli as provider_cli

        run: Any = provider_cli.commands["run"]
        assert any(getattr(p, "envvar", None) == "HIVEMART_API_KEY" for p in run.params)
    if "compose" in text:
        compose = (ROOT / "deploy" / "compose.yaml").read_text()
        for service in re.findall(r"(?:logs|exec) (\w+)", text):
            assert re.search(rf"^  {service}:", compose, re.M), f"{text!r}: compose.yaml has no service {service}"


@pytest.mark.swarm
def test_the_dht_logs_its_multiaddrs_even_with_a_ready_file(tmp_path: Path) -> None:
    """`docker compose logs dht` shows the bootstrap multiaddrs: compose runs the node with
    --ready-file, and the ready line goes to the log as well."""
    ready = tmp_path / "dht.ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "provider_agent.cli", "dht", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stderr is not None
        logged = b""
        deadline = time.monotonic() + 90
        while b'"ready"' not in logged and time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stderr], [], [], 1.0)[0]:
                logged += process.stderr.read1(65536)  # type: ignore[attr-defined]
        line = next(x for x in logged.decode().splitlines() if '"ready"' in x)
        maddrs = json.loads(line[line.index("{") :])["ready"]["maddrs"]  # the ready line, inside its log record
        assert maddrs and all("/p2p/" in m for m in maddrs)
        assert json.loads(ready.read_text())["ready"]["maddrs"] == maddrs
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
