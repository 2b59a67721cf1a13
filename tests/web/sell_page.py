"""Reading the Sell page's agent command back out of its HTML, as a seller copies it."""

from __future__ import annotations

import html
import re
import shlex


def _pre(body: str, element_id: str) -> str:
    match = re.search(rf'<pre id="{element_id}"><code>(.*?)</code></pre>', body, re.S)
    assert match, f"no #{element_id} on the page"
    return html.unescape(match.group(1))


def sell_env(body: str) -> dict[str, str]:
    """The ``export NAME=value  # comment`` lines above the command."""
    env = {}
    for line in _pre(body, "provider-env").splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        env[name] = value
    return env


def sell_command_text(body: str) -> str:
    """The command exactly as shown (with its line continuations)."""
    return _pre(body, "provider-command")


def sell_argv(body: str) -> list[str]:
    return shlex.split(sell_command_text(body).replace("\\\n", " "))
