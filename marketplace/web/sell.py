"""The Sell page's agent command: complete and correct for the swarm this marketplace runs.

Everything in it comes from this site's settings and catalog: the marketplace's address, the
swarm's bootstrap multiaddrs (``HIVEMART_SWARM_PEERS``), the heartbeat period the market's
timeout is set for (``HIVEMART_HEARTBEAT_PERIOD_S``), a block count the model has, and listen
and announce addresses that fit where the swarm is (loopback for a swarm on this machine, such
as the demo's; a public port otherwise). What only the seller knows (the API key, where the
checkpoint is, the public address) goes into environment variables set just before it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SellCommand", "sell_command", "MAX_SUGGESTED_BLOCKS", "PROVIDER_PORT"]

# A span a mid-range GPU holds for a 7-8B model; a smaller model is served whole.
MAX_SUGGESTED_BLOCKS = 8
# The agent's public port in the suggested command (the bootstrap node conventionally uses 31337).
PROVIDER_PORT = 31338
_LOOPBACK_PREFIXES = ("/ip4/127.", "/ip6/::1/", "/dns4/localhost/", "/dns/localhost/")


@dataclass(frozen=True)
class SellCommand:
    """``env``: ``(name, value, comment)`` to export first; ``argv``: the command line."""

    env: tuple[tuple[str, str, str], ...]
    argv: tuple[str, ...]
    loopback: bool

    def env_text(self) -> str:
        width = max(len(f"export {n}={v}") for n, v, _ in self.env)
        return "\n".join(f"{f'export {n}={v}':<{width}}  # {c}" for n, v, c in self.env)

    def argv_text(self) -> str:
        """The command, one option (with its value) per line, ready to paste into a shell."""
        head, options = self.argv[:2], self.argv[2:]
        lines = [" ".join(head)]
        i = 0
        while i < len(options):
            flag = options[i]
            value = options[i + 1] if i + 1 < len(options) and not options[i + 1].startswith("--") else None
            lines.append(f"  {flag}" + (f" {_quote(value)}" if value is not None else ""))
            i += 2 if value is not None else 1
        return " \\\n".join(lines)


def _quote(value: str) -> str:
    # $PUBLIC_IP must stay expandable; everything else is quoted only when the shell needs it.
    return value if value.startswith("/ip4/$PUBLIC_IP/") else shlex.quote(value)


def is_loopback(maddr: str) -> bool:
    return maddr.startswith(_LOOPBACK_PREFIXES)


def sell_command(
    *, market_url: str, model_id: str | None, num_blocks: int | None, swarm_peers: Sequence[str], heartbeat_period: int
) -> SellCommand:
    """The environment and ``hivemart-provider run`` command a seller pastes to serve ``model_id``."""
    loopback = bool(swarm_peers) and all(is_loopback(p) for p in swarm_peers)
    env: list[tuple[str, str, str]] = [
        ("HIVEMART_API_KEY", "hm_YOUR_KEY", "from the API keys page (kept out of ps and shell history)"),
        ("HIVEMART_MODEL", f"/path/to/{model_id or 'model'}", "the model's checkpoint folder"),
    ]
    if not swarm_peers:
        env.append(
            (
                "HIVEMART_INITIAL_PEERS",
                "/dns4/HOST/tcp/31337/p2p/PEER_ID",
                "this marketplace has not published its swarm's bootstrap address: ask its operator",
            )
        )
    if not loopback:
        env.append(("PUBLIC_IP", "203.0.113.7", f"this machine's public IPv4 address; open TCP port {PROVIDER_PORT}"))
    argv = ["hivemart-provider", "run", "--market", market_url]
    if num_blocks:
        argv += ["--num-blocks", str(min(MAX_SUGGESTED_BLOCKS, num_blocks))]
    argv += ["--price", "1000", "--device", "auto", "--heartbeat-period", str(heartbeat_period)]
    if loopback:
        # The swarm is on this machine (a demo): listen where it is; the listening address is announced.
        argv += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    else:
        argv += ["--host-maddrs", f"/ip4/0.0.0.0/tcp/{PROVIDER_PORT}"]
        argv += ["--announce-maddrs", f"/ip4/$PUBLIC_IP/tcp/{PROVIDER_PORT}"]
    for peer in swarm_peers:
        argv += ["--initial-peers", peer]
    argv[0] = ".venv/bin/hivemart-provider"
    return SellCommand(env=tuple(env), argv=tuple(argv), loopback=loopback)
