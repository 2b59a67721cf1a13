"""A loopback stand-in for Stripe's API (no outside network is reachable here) and Stripe's
webhook signature, computed the way Stripe computes it.

:class:`StripeStandIn` answers ``POST /v1/checkout/sessions`` like Stripe's API does (a
Checkout Session object as JSON), remembers each request (form fields, headers) and replays
the same session for a repeated ``Idempotency-Key``, as Stripe does. ``fail_with`` makes it
answer an error instead.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

WEBHOOK_SECRET = "whsec_test_hivemart_standin"
SECRET_KEY = "sk_test_hivemart_standin"


def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe sends with ``payload``: ``t=<unix time>,v1=<hex
    HMAC-SHA256 of "<t>.<payload>" keyed with the endpoint's signing secret>``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def session_event(
    session: dict[str, Any], *, type: str = "checkout.session.completed", event_id: str | None = None, **changes: Any
) -> bytes:
    """A Stripe event about ``session`` (paid, unless ``changes`` say otherwise), as Stripe posts it."""
    obj = {**session, "payment_status": "paid", "status": "complete", **changes}
    event = {
        "id": event_id or f"evt_{next(_ids)}",
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "type": type,
        "livemode": False,
        "data": {"object": obj},
    }
    return json.dumps(event).encode()


_ids = itertools.count(1)


@dataclass
class StripeStandIn:
    requests: list[dict[str, Any]] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id
    by_key: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> session id
    fail_with: int | None = None
    url: str = ""

    def start(self) -> StripeStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = dict(parse_qsl(body))
                standin.requests.append({"path": self.path, "form": form, "headers": dict(self.headers)})
                if self.path != "/v1/checkout/sessions":
                    return self._answer(404, {"error": {"type": "invalid_request_error", "message": "no such route"}})
                if standin.fail_with is not None:
                    return self._answer(
                        standin.fail_with, {"error": {"type": "api_error", "message": "stand-in says no"}}
                    )
                key = self.headers.get("Idempotency-Key", "")
                if key in standin.by_key:
                    return self._answer(200, standin.sessions[standin.by_key[key]])
                sid = f"cs_test_{next(_ids)}"
                session = {
                    "id": sid,
                    "object": "checkout.session",
                    "url": f"https://checkout.stripe.test/c/pay/{sid}",
                    "amount_total": int(form["line_items[0][price_data][unit_amount]"]),
                    "currency": form["line_items[0][price_data][currency]"],
                    "client_reference_id": form.get("client_reference_id"),
                    "metadata": {"topup": form.get("metadata[topup]")},
                    "payment_status": "unpaid",
                    "status": "open",
                    "mode": form.get("mode"),
                }
                standin.sessions[sid] = session
                if key:
                    standin.by_key[key] = sid
                return self._answer(200, session)

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", "req_standin")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
