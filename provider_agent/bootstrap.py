"""A bootstrap DHT node: a peer that serves no blocks, only the DHT, at a known address."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

from hivemind.dht.node import DHTNode
from hivemind.utils.logging import get_logger

from hivemart_core.protocol.identity import Identity
from hivemart_core.swarm.dht import SignedRecordValidator
from hivemart_core.swarm.p2p import start_p2p, stop_p2p
from provider_agent.identity_lock import hold_identity

logger = get_logger(__name__)


async def run_bootstrap(
    *,
    host_maddrs: list[str],
    identity_path: Path | None,
    initial_peers: list[str],
    ready_file: Path | None,
    stop: asyncio.Event,
) -> None:
    """Serve the DHT until ``stop`` is set; its identity (when given) is locked meanwhile."""
    with contextlib.ExitStack() as held:
        if identity_path is not None:
            held.enter_context(hold_identity(identity_path))
            Identity.load_or_create(identity_path)
        await _serve(
            host_maddrs=host_maddrs,
            identity_path=identity_path,
            initial_peers=initial_peers,
            ready_file=ready_file,
            stop=stop,
        )


async def _serve(
    *,
    host_maddrs: list[str],
    identity_path: Path | None,
    initial_peers: list[str],
    ready_file: Path | None,
    stop: asyncio.Event,
) -> None:
    p2p = await start_p2p(initial_peers=initial_peers, identity_path=identity_path, host_maddrs=host_maddrs)
    node = None
    try:
        node = await DHTNode.create(
            p2p=p2p,
            initial_peers=initial_peers or None,
            ensure_bootstrap_success=bool(initial_peers),
            record_validator=SignedRecordValidator(),
        )
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        ready = {"peer_id": str(p2p.peer_id), "maddrs": maddrs}
        line = json.dumps({"ready": ready})
        if ready_file is not None:
            await asyncio.to_thread(_write_atomically, ready_file, line + "\n")
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        # Also in the log at the default level (`docker compose logs dht`, journalctl): how an
        # operator learns the multiaddrs to hand out. One record, so JSON logs stay JSON lines.
        logger.info(f"bootstrap DHT node ready: {line}", extra={"ready": ready})
        await stop.wait()
    finally:
        # Bounded: after a signal to our process group the daemon may be gone already, and
        # hivemind's shutdown would then wait on it forever.
        await stop_p2p(p2p, *([node.shutdown] if node is not None else []))


def _write_atomically(path: Path, text: str) -> None:
    # Whoever waits for the file sees it whole or not at all.
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
