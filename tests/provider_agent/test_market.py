"""MarketLink through marketplace outages: the platform key and receipt uploads are retried
until the marketplace answers, and no receipt is lost or sent twice in the meantime.

The real SDK client talks to a scripted marketplace (httpx.MockTransport); the live
marketplace is exercised in tests/swarm/test_market_link.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

import provider_agent.market as market
from hivemart_core.api import Client
from hivemart_core.protocol.identity import Identity, verify_signature
from hivemart_core.protocol.receipts import WorkReceipt
from hivemart_core.protocol.tickets import issue_ticket
from provider_agent.config import AgentConfig
from provider_agent.market import MarketLink, Offer
from provider_agent.metering import TicketBook

PLATFORM = Identity.from_seed(b"p" * 32)
PROVIDER = Identity.from_seed(b"v" * 32)
MODEL = "llama-4x64-000000000001"


class ScriptedMarket:
    """Answers 503 while ``down``; records every receipt it accepts."""

    def __init__(self) -> None:
        self.down = True
        self.requests: list[str] = []
        self.accepted: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.down:
            return httpx.Response(503, json={"code": "unavailable", "message": "down for maintenance"})
        if request.url.path == "/api/platform/":
            return httpx.Response(
                200, json={"public_key": PLATFORM.public_key.hex(), "peer_id": PLATFORM.peer_id, "fee_bps": 500}
            )
        if request.url.path == "/api/receipts/":
            receipts = json.loads(request.content)["receipts"]
            self.accepted += receipts
            return httpx.Response(
                200,
                json={
                    "results": [
                        {
                            "status": "accepted",
                            "code": "",
                            "message": "",
                            "ticket_id": r["ticket_id"],
                            "session_id": r["session_id"],
                            "seq": r["seq"],
                        }
                        for r in receipts
                    ]
                },
            )
        return httpx.Response(404, json={"code": "not_found", "message": request.url.path})


def link_for(scripted: Callable[[httpx.Request], httpx.Response], book: TicketBook) -> MarketLink:
    config = AgentConfig(model_path=Path("."), market_url="http://market.test", api_key="hm_test", upload_period=0.05)
    client = Client(
        api_key="hm_test", base_url="http://market.test", max_retries=1, transport=httpx.MockTransport(scripted)
    )
    client._core._sleep = lambda seconds: None  # the SDK's own retry pause; the link's backoff is what we test
    offer = Offer(model_id=MODEL, start=0, end=2, block_digests=("0" * 64,) * 2, price=1000)
    return MarketLink(config, PROVIDER, book, offer=lambda: offer, status=lambda: ("online", 1.0), client=client)


def work(book: TicketBook, sessions: int) -> list[WorkReceipt]:
    ticket = book.check(
        issue_ticket(
            PLATFORM,
            ticket_id="ticket-0001",
            job_id=1,
            client_key="11" * 32,
            provider_peer=PROVIDER.peer_id,
            model_id=MODEL,
            model_digest="ab" * 32,
            start=0,
            end=2,
            max_units=10**6,
            price=1000,
            credit_units=10**6,
            expires_at=2_000_000_000,
        ).to_dict(),
        0,
        2,
    )
    receipts = []
    for i in range(sessions):
        book.charge(ticket, f"session-{i:04d}", tokens=1, blocks=2).commit([torch.zeros(1, 1, 4)])
        receipts.append(book.receipt(ticket, f"session-{i:04d}"))
    return receipts


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(market, "_BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(market, "_BACKOFF_MAX_S", 0.05)


def test_the_platform_key_is_fetched_once_the_marketplace_is_back():
    scripted = ScriptedMarket()
    book = TicketBook(identity=PROVIDER, model_id=MODEL, platform_key=None)
    link = link_for(scripted, book)

    async def scenario() -> None:
        task = asyncio.ensure_future(link._retrying("fetch the platform key", link._learn_platform_key))
        while scripted.requests.count("GET /api/platform/") < 4:  # several failed attempts, backing off
            await asyncio.sleep(0.01)
        assert book.platform_key is None and not task.done()
        scripted.down = False
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert book.platform_key == PLATFORM.public_key


def test_receipts_wait_through_an_outage_and_are_uploaded_once_each():
    scripted = ScriptedMarket()
    book = TicketBook(identity=PROVIDER, model_id=MODEL, platform_key=PLATFORM.public_key)
    link = link_for(scripted, book)
    first = work(book, 3)

    async def scenario() -> None:
        uploader = asyncio.ensure_future(link._upload_loop())
        while scripted.requests.count("POST /api/receipts/") < 4:
            await asyncio.sleep(0.01)
        assert book.pending_count() == 3 and scripted.accepted == []  # nothing lost while the marketplace is down
        scripted.down = False
        while link.uploaded["accepted"] < 3:
            await asyncio.sleep(0.01)
        uploader.cancel()

    asyncio.run(scenario())
    assert sorted((r["session_id"], r["seq"]) for r in scripted.accepted) == [(r.session_id, r.seq) for r in first]
    assert book.pending_count() == 0


def test_shutdown_uploads_what_is_left_in_batches_of_at_most_500():
    scripted = ScriptedMarket()
    scripted.down = False
    book = TicketBook(identity=PROVIDER, model_id=MODEL, platform_key=PLATFORM.public_key)
    link = link_for(scripted, book)
    work(book, 501)
    asyncio.run(link.close())
    assert scripted.requests.count("POST /api/receipts/") == 2 and len(scripted.accepted) == 501
    assert book.pending_count() == 0


class ScriptedCatalog:
    """Registration endpoints: a challenge, the catalog entry of MODEL, the provider resource."""

    def __init__(self, block_digests: list[str] | None) -> None:
        self.block_digests = block_digests  # None: MODEL is not catalogued
        self.calls: list[tuple[str, str, dict]] = []
        self.provider = {
            "id": 1,
            "peer_id": PROVIDER.peer_id,
            "public_key": PROVIDER.public_key.hex(),
            "model": MODEL,
            "block_start": 0,
            "block_end": 2,
            "price": 1000,
            "state": "joining",
            "earnings_account": 9,
            "registered_at": "2026-01-01T00:00:00Z",
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/api/providers/challenge/":
            return httpx.Response(
                201,
                json={
                    "challenge": "00" * 32,
                    "expires_at": "2026-01-01T00:00:00Z",
                    "message_prefix": "hivemart-register:",
                },
            )
        if path == f"/api/models/{MODEL}/":
            if self.block_digests is None:
                return httpx.Response(404, json={"code": "not_found", "message": "no such model"})
            return httpx.Response(
                200,
                json={
                    "model_id": MODEL,
                    "arch": "llama",
                    "num_blocks": 4,
                    "hidden_size": 64,
                    "dtype": "float32",
                    "weights_digest": "ab" * 32,
                    "active": True,
                    "block_digests": self.block_digests,
                    "created_at": "2026-01-01T00:00:00Z",
                },
            )
        if path in ("/api/providers/", "/api/providers/1/", "/api/providers/1/heartbeat/"):
            self.provider.update({k: v for k, v in body.items() if k in ("block_start", "block_end", "price", "state")})
            return httpx.Response(
                201 if request.method == "POST" and path == "/api/providers/" else 200, json=self.provider
            )
        return httpx.Response(404, json={"code": "not_found", "message": path})


DIGESTS = [f"{i:064x}" for i in range(4)]


def registering_link(scripted: ScriptedCatalog, offers: list[Offer]) -> MarketLink:
    link = link_for(scripted, TicketBook(identity=PROVIDER, model_id=MODEL, platform_key=PLATFORM.public_key))
    link.offer = lambda: offers[-1]
    return link


def offer(start: int, end: int, digests: list[str] = DIGESTS) -> Offer:
    return Offer(model_id=MODEL, start=start, end=end, block_digests=tuple(digests[start:end]), price=1000, gpu="cpu")


def test_registration_signs_the_challenge_and_a_move_updates_the_offer_before_the_heartbeat():
    scripted, offers = ScriptedCatalog(DIGESTS), [offer(0, 2)]
    link = registering_link(scripted, offers)

    async def scenario() -> None:
        await link._register()
        await link.heartbeat()
        offers.append(offer(2, 4))  # the rebalancer moved the agent
        await link.heartbeat()

    asyncio.run(scenario())
    register = next(body for method, path, body in scripted.calls if (method, path) == ("POST", "/api/providers/"))
    assert register["peer_id"] == PROVIDER.peer_id and register["price"] == 1000 and register["gpu"] == "cpu"
    message = b"hivemart-register:" + bytes(32)
    assert PROVIDER.public_key == bytes.fromhex(register["public_key"])
    assert verify_signature(PROVIDER.public_key, message, bytes.fromhex(register["signature"]))
    writes = [(method, path) for method, path, _ in scripted.calls if method in ("PATCH", "POST")]
    assert writes[-3:] == [
        ("POST", "/api/providers/1/heartbeat/"),
        ("PATCH", "/api/providers/1/"),
        ("POST", "/api/providers/1/heartbeat/"),
    ]
    assert (scripted.provider["block_start"], scripted.provider["block_end"]) == (2, 4)


@pytest.mark.parametrize(
    "catalogued, message",
    [
        (None, "hivemart models register"),
        ([f"{i + 100:064x}" for i in range(4)], "differ from those the catalog lists"),
    ],
    ids=["not-catalogued", "other-weights"],
)
def test_an_offer_the_catalog_cannot_back_is_a_setup_error_for_the_operator(catalogued, message):
    scripted = ScriptedCatalog(catalogued)
    link = registering_link(scripted, [offer(0, 2)])
    with pytest.raises(market.MarketSetupError, match=message):
        asyncio.run(link._register())
    assert ("POST", "/api/providers/") not in [(m, p) for m, p, _ in scripted.calls]


class FlakyHeartbeats(ScriptedCatalog):
    """Heartbeat requests 3 to 6 answer 503 (an outage: two heartbeats, each tried twice by the
    client); the rest as usual."""

    def __init__(self) -> None:
        super().__init__(DIGESTS)
        self.heartbeats = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/providers/1/heartbeat/":
            self.heartbeats += 1
            if 3 <= self.heartbeats <= 6:
                return httpx.Response(503, json={"code": "unavailable", "message": "down for maintenance"})
        return super().__call__(request)


def test_heartbeats_are_logged_only_when_the_link_changes_state(caplog: pytest.LogCaptureFixture):
    scripted = FlakyHeartbeats()
    link = registering_link(scripted, [offer(0, 2)])
    link.config.heartbeat_period = 0.001

    async def scenario() -> None:
        loop = asyncio.ensure_future(link._heartbeat_loop())
        while scripted.heartbeats < 12:
            await asyncio.sleep(0.001)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    with caplog.at_level("DEBUG", logger="provider_agent.market"):
        asyncio.run(scenario())
    heartbeat_lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "provider_agent.market" and "heartbeat" in r.getMessage()
    ]
    shown = [(level, message) for level, message in heartbeat_lines if level > logging.DEBUG]
    # 10 heartbeats, 2 of them failed: one line when the first is accepted, one when they start
    # failing, one when they recover; the repeated failure only at DEBUG.
    assert [level for level, _ in shown] == [logging.INFO, logging.WARNING, logging.INFO], shown
    assert shown[0][1].startswith("online at the marketplace")
    assert "still serving" in shown[1][1] and shown[2][1].startswith("heartbeats recovered after 2 failed")
    assert sum(level == logging.DEBUG for level, _ in heartbeat_lines) == 1
