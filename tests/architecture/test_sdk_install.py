"""``pip install hivemart`` (the SDK and CLI) works without the server stack: each check runs
in a fresh interpreter whose import system refuses Django, Celery and the rest, as if they
were not installed, and imports the SDK, the provider agent, and runs the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.architecture.imports import ROOT

# The marketplace's dependencies (pyproject's ``market`` extra), as top-level module names.
BLOCKED = ("django", "celery", "kombu", "psycopg", "gunicorn", "rest_framework", "whitenoise")

_PRELUDE = textwrap.dedent(
    f"""
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = {BLOCKED!r}

    class NotInstalled(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}} (blocked: not in the SDK install)", name=name)
            return None

    for name in list(sys.modules):  # nothing imported so far may smuggle them in
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, NotInstalled())
    """
)


def _run(body: str) -> subprocess.CompletedProcess[str]:
    code = _PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_blocker_blocks() -> None:
    # The check itself: with the finder in place, Django cannot be imported.
    result = _run("import django\n")
    assert result.returncode != 0 and "blocked: not in the SDK install" in result.stderr


def test_the_sdk_and_provider_import_without_the_server_stack() -> None:
    result = _run(
        """
        import client_sdk, client_sdk.api, client_sdk.swarm.model, hivemart_core.models, provider_agent.cli
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_cli_runs_without_the_server_stack() -> None:
    result = _run(
        """
        from hivemart.cli import cli
        for args in (["--help"], ["generate", "--help"]):
            try:
                cli.main(args, prog_name="hivemart", standalone_mode=True)
            except SystemExit as e:
                assert e.code in (0, None), (args, e.code)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: hivemart" in result.stdout and "generate" in result.stdout
    assert result.stdout.strip().endswith("ok")


def test_commands_that_need_the_marketplace_say_which_extra_to_install() -> None:
    for args, extra in ((["demo"], "all"), (["bench", "ledger"], "market")):
        result = _run(
            f"""
            from hivemart.cli import cli
            cli.main({args!r}, prog_name="hivemart", standalone_mode=True)
            """
        )
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)  # one line, no traceback
        assert f"pip install 'hivemart[{extra}]'" in lines[0] and "django" in lines[0]


def test_the_marketplace_command_says_which_extra_to_install() -> None:
    # `pip install hivemart` installs the hivemart-market script too; without the extra it must
    # say what to install, not end in an ImportError from Django's import.
    result = _run(
        """
        from marketplace.manage import main
        main(["hivemart-market", "migrate"])
        """
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: hivemart-market needs the marketplace's packages: pip install 'hivemart[market]'"
    ]
