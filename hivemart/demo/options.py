"""What a demo run is asked to do (``DemoOptions``) and what its phases learn on the way
(``DemoState``): shared by the scenario and its phases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DemoOptions:
    home: Path
    new_tokens: int = 48
    kill_at: int = 16
    finetune_steps: int = 30
    verify_rate: float = 0.2
    keep: bool = False
    say: Callable[[str], None] = print
    # called with the summary before --keep waits, so that scripts see it while it all runs
    emit_summary: Callable[[dict[str, Any]], None] = lambda summary: None
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True)


@dataclass
class DemoState:
    model_path: Path | None = None
    model_id: str = ""
