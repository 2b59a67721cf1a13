"""How the provider's processes (agent, bootstrap node) take SIGINT and SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from hivemind.utils.logging import get_logger

__all__ = ["install_stop_signals"]

logger = get_logger(__name__)


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGINT or SIGTERM sets ``stop`` (an orderly, bounded shutdown); a second one of either
    gets the default action, so an impatient operator never needs SIGKILL."""

    def first(sig: int) -> None:
        logger.info(f"{signal.Signals(sig).name}: stopping (signal again to exit at once)")
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)
