"""The gateway under a real uvicorn server on loopback, over the shared two-provider swarm."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from client_sdk.swarm.local import LocalSwarm

GATEWAY_KEY = "test-gateway-key-0123456789"


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread; yields its base URL, and shuts it down gracefully."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(tiny_model: Path, two_provider_swarm: LocalSwarm) -> Iterator[Any]:
    from hivemart.serve.engine import Served

    served = Served.load(tiny_model, initial_peers=list(two_provider_swarm.initial_peers), name="tiny")
    yield served
    served.model.close()


@pytest.fixture(scope="module")
def gateway(served: Any) -> Iterator[tuple[str, Any]]:
    """A free gateway guarded by ``GATEWAY_KEY``: (base URL, the app)."""
    from hivemart.serve.app import create_app

    app = create_app(served, api_key=GATEWAY_KEY, close_served=False)
    with running(app) as url:
        yield url, app
