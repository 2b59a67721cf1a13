"""The announcer's records replace each other in a real DHT node: every record it stores
expires after the previous one (the DHT keeps only the latest-expiring one per peer), so an
offline record always supersedes the online one; a withdrawal the DHT refuses is reported."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from hivemind.dht.node import DHTNode

from hivemart_core.models import load_model_info
from hivemart_core.models.backend import SpanBackend
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import MAX_RECORD_TTL_S, ServerState
from hivemart_core.swarm.dht import SignedRecordValidator, announce_span, fetch_span_records
from provider_agent.agent import Announcer
from provider_agent.config import AgentConfig
from provider_agent.server import ProviderServer

pytestmark = [pytest.mark.swarm]


async def with_announcer(model: Path, check) -> None:
    node = await DHTNode.create(record_validator=SignedRecordValidator())
    try:
        config = AgentConfig(model_path=model, blocks=(0, 2))
        info = load_model_info(model)
        identity = Identity.generate()
        server = ProviderServer(
            SpanBackend(model, 0, 2), config, node.p2p, info.model_id, block_digests=[], identity=identity
        )
        await check(node, Announcer(node, identity, server, config, 100.0, []), info.model_id)
    finally:
        await node.shutdown()


def test_withdrawal_supersedes_the_online_record(tiny_model: Path) -> None:
    async def check(node: DHTNode, announcer: Announcer, model_id: str) -> None:
        peer = announcer.identity.peer_id
        await announcer.announce()
        assert (await fetch_span_records(node, model_id, range(2)))[peer].state == ServerState.ONLINE
        assert await announcer.withdraw() is True
        assert peer not in await fetch_span_records(node, model_id, range(2))
        # Coming back online (a move to new blocks) supersedes the offline record in turn.
        await announcer.announce()
        assert peer in await fetch_span_records(node, model_id, range(2))
        assert announcer.record(ServerState.ONLINE, 10 * MAX_RECORD_TTL_S).expires_at <= time.time() + MAX_RECORD_TTL_S

    asyncio.run(with_announcer(tiny_model, check))


def test_a_refused_withdrawal_is_reported(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def check(node: DHTNode, announcer: Announcer, model_id: str) -> None:
        # A record of the same identity that expires later than anything this announcer would
        # store (left by an earlier run with a long lifetime) makes the DHT refuse the withdrawal.
        lingering = announcer.record(ServerState.ONLINE, MAX_RECORD_TTL_S - 5)
        assert await announce_span(node, announcer.identity, lingering)
        restarted = Announcer(node, announcer.identity, announcer.server, announcer.config, 100.0, [])
        with caplog.at_level(logging.WARNING, logger="provider_agent.agent"):
            assert await restarted.withdraw() is False
        assert "refused our offline record" in caplog.text

    asyncio.run(with_announcer(tiny_model, check))
