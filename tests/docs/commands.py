"""The commands README.md and docs/ tell people to run, as they are written there.

Two places hold them: lines of fenced ``bash``/``sh``/``console`` blocks (a trailing ``\\``
joins the next line; ``# comments`` are dropped), and inline code spans that start with one
of Hivemart's programs or a tool the deployment guides use (``hivemart-market migrate``,
``docker compose ...``). Names alone (``hivemart-provider run`` inside a sentence) count too:
the subcommand they name must exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("hivemart", "hivemart-market", "hivemart-provider", ".venv/bin/", "docker", "systemctl", "journalctl")
_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _is_command(text: str) -> bool:
    first = text.split(maxsplit=1)[0] if text.strip() else ""
    return first in PROGRAMS or first.startswith(".venv/bin/") or first.startswith("./scripts/")


def _strip_comment(line: str) -> str:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:
        return line.strip()
    if not words:
        return ""
    # cut the raw line where the comment starts, keeping quoting as written
    cut = line.find(" #")
    return (line[:cut] if cut != -1 else line).strip()


def fenced(text: str) -> list[str]:
    commands: list[str] = []
    inside = False
    pending = ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            inside = bool(_FENCE.match(raw)) and not inside
            pending = ""
            continue
        if not inside:
            continue
        line = _strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            commands.append(re.sub(r"\s+", " ", line))
    return commands


def inline(text: str) -> list[str]:
    outside_fences = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = [m.strip() for m in _INLINE.findall(outside_fences)]
    # a program's bare name (`hivemart`, `.venv/bin/`) is a name, not a command
    return [m for m in spans if _is_command(m) and (len(m.split()) > 1 or m.startswith("./scripts/"))]


def documented_commands() -> dict[str, list[str]]:
    """``{command: [documents it appears in]}``."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text()
        for command in [*fenced(text), *inline(text)]:
            found.setdefault(command, [])
            name = str(path.relative_to(ROOT))
            if name not in found[command]:
                found[command].append(name)
    return found
