"""The demo's gateway step: ``hivemart serve --market`` in front of the demo's swarm, and one
chat completion through it over plain HTTP (what any OpenAI client sends), paid by the demo
client's API key as a job of its own that the settlement phase then settles."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

MESSAGES = [{"role": "user", "content": "Who pays the providers?"}]


def call_gateway(*, model: Any, market_url: str, client_key: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Serve the demo's open ``model`` through a gateway paid on ``market_url``, ask it one chat
    completion with ``client_key``, and stop it; returns the job, the tokens and the reply."""
    import uvicorn

    from hivemart.serve.app import create_app
    from hivemart.serve.engine import MarketPayer, Served

    served = Served.for_model(model, name="demo")
    payer = MarketPayer(market_url, budget=5_000_000, max_price=2_000_000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(served, payer=payer, close_served=False), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        response = httpx.post(
            url,
            headers={"Authorization": f"Bearer {client_key}"},
            json={"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0},
            timeout=180,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"the gateway answered {response.status_code}: {body}")
    reply, usage = body["choices"][0]["message"]["content"], body["usage"]
    job = body.get("hivemart", {}).get("job")
    say(
        f"      POST {url} -> {reply!r} ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
        f"completion tokens, paid as job {job})"
    )
    return {"job": job, "completion_tokens": usage["completion_tokens"], "reply": reply}
