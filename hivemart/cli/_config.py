"""Where the ``hivemart`` CLI keeps the marketplace address and API key between commands.

One JSON file, ``$HIVEMART_CONFIG`` or ``$XDG_CONFIG_HOME/hivemart/config.json`` (default
``~/.config/hivemart/config.json``), written with mode 0600 because it holds a secret.
``HIVEMART_URL`` and ``HIVEMART_API_KEY`` override what the file says, and flags override both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hivemart_core.api._client import DEFAULT_BASE_URL, normalize_base_url

__all__ = ["CliConfig", "config_path", "load_config", "save_config"]


@dataclass(frozen=True)
class CliConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    username: str | None = None


def config_path() -> Path:
    if os.environ.get("HIVEMART_CONFIG"):
        return Path(os.environ["HIVEMART_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "hivemart" / "config.json"


def _read_file() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}; fix or delete it, then run `hivemart login` again") from e
    return data if isinstance(data, dict) else {}


def load_config(*, base_url: str | None = None, api_key: str | None = None) -> CliConfig:
    """The effective settings: flags, then environment variables, then the config file."""
    stored = _read_file()
    url = base_url or os.environ.get("HIVEMART_URL") or stored.get("base_url") or DEFAULT_BASE_URL
    key = api_key or os.environ.get("HIVEMART_API_KEY") or stored.get("api_key")
    username = stored.get("username") if isinstance(stored.get("username"), str) else None
    return CliConfig(
        base_url=normalize_base_url(str(url)), api_key=key if isinstance(key, str) else None, username=username
    )


def save_config(config: CliConfig) -> Path:
    """Write the file atomically, readable by its owner only."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"base_url": config.base_url, "api_key": config.api_key, "username": config.username}, f, indent=2)
    os.replace(tmp, path)
    return path
