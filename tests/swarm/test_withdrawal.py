"""Withdrawal withdraws: a provider stopped with SIGTERM disappears from the DHT at once, and
no record can make itself live for longer than the swarm allows."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from hivemind.utils.timed_storage import get_dht_time

from client_sdk.swarm.local import LocalSwarm
from hivemart_core.models import load_model_info
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import ServerRecord, ServerState, block_key, sign_record
from hivemart_core.swarm.dht import announce_span, fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

YEAR = 365 * 24 * 3600.0


def test_sigterm_replaces_the_online_record_with_an_offline_one_at_once(tiny_model: Path, tmp_path: Path):
    swarm = start_swarm(tiny_model, [(0, 4), (0, 4)], tmp_path)
    try:
        info = load_model_info(tiny_model)
        leaving, staying = swarm.agents
        with SwarmRuntime(swarm.initial_peers) as runtime:

            def live() -> dict[str, ServerRecord]:
                return runtime.run(fetch_span_records(runtime.dht, info.model_id, range(info.num_blocks)))

            assert {leaving.peer_id, staying.peer_id} <= set(live())  # also in this client's DHT cache now
            assert swarm.stop_agent(leaving, sig=signal.SIGTERM) == 0
            # Its online record would still be valid for up to 30 s: the offline one replaced it.
            records = live()
            assert leaving.peer_id not in records
            assert staying.peer_id in records
        assert "offline record" not in leaving.log_tail(100)  # the withdrawal was not refused anywhere
    finally:
        swarm.stop()


def year_long(identity: Identity, model_id: str) -> ServerRecord:
    return ServerRecord(
        peer_id=identity.peer_id,
        model_id=model_id,
        start=0,
        end=4,
        state=ServerState.ONLINE,
        throughput=1.0,
        dtype="float32",
        cache_tokens_left=10**6,
        expires_at=time.time() + YEAR,
    )


def test_a_record_cannot_make_itself_live_for_a_year(tiny_model: Path, two_provider_swarm: LocalSwarm):
    swarm = two_provider_swarm  # the session's: the attack is refused, so nothing in it changes
    info = load_model_info(tiny_model)
    signer = Identity.generate()
    record = year_long(signer, info.model_id)
    with SwarmRuntime(swarm.initial_peers) as runtime:

        async def attack() -> tuple[bool, dict[str, ServerRecord]]:
            stored = await runtime.dht.store(
                block_key(info.model_id, 0),
                sign_record(record, signer),
                get_dht_time() + YEAR,
                subkey=signer.peer_id,
            )
            return stored, await fetch_span_records(runtime.dht, info.model_id, range(info.num_blocks))

        stored, records = runtime.run(attack())
        assert stored is False  # every DHT node refused it
        assert signer.peer_id not in records and swarm.agents[0].peer_id in records
        with pytest.raises(ValueError, match="at most"):  # and an agent will not announce one
            runtime.run(announce_span(runtime.dht, signer, record))
