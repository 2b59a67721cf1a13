"""Routing over signed records: throughput claims cannot capture it, free clients skip paid
providers, and records cannot ask for long lifetimes (the pure parts; the live ones are in
tests/swarm/test_hostile_routing.py and tests/swarm/test_withdrawal.py)."""

from __future__ import annotations

import time

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.routing import find_route, trusted_throughputs
from hivemart_core.errors import NoProvidersError, ProtocolError
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import (
    MAX_RECORD_TTL_S,
    ServerRecord,
    ServerState,
    block_key,
    sign_record,
    verify_signed_record,
)
from hivemart_core.swarm.dht import SignedRecordValidator

MODEL = "tiny-model"
IDS = [Identity.generate() for _ in range(5)]
PEERS = [i.peer_id for i in IDS]


def record(peer: int, start: int, end: int, throughput: float, *, ttl: float = 60.0, **extra) -> ServerRecord:
    return ServerRecord(
        peer_id=PEERS[peer],
        model_id=MODEL,
        start=start,
        end=end,
        state=ServerState.ONLINE,
        throughput=throughput,
        dtype="float32",
        cache_tokens_left=1000,
        expires_at=time.time() + ttl,
        **extra,
    )


def route(records, **kwargs) -> list[tuple[int, int, int]]:
    return [(PEERS.index(h.peer_id), h.start, h.end) for h in find_route(records, MODEL, 0, 4, **kwargs)]


# Three honest providers of every block and one that claims a trillion tokens per second.
HONEST = [record(0, 0, 4, 2000.0), record(1, 0, 4, 1500.0), record(2, 0, 4, 1000.0)]
LOUD = record(3, 0, 4, 1e12)


def test_an_unverified_claim_counts_no_more_than_the_median_claim() -> None:
    assert route([*HONEST, LOUD]) == [(0, 0, 4)]  # the fastest honest one, not the loudest claim
    assert trusted_throughputs([*HONEST, LOUD], frozenset())[PEERS[3]] == 1500.0


def test_a_peer_that_served_us_counts_with_its_own_figure() -> None:
    assert route([*HONEST, LOUD], verified={PEERS[3]}) == [(3, 0, 4)]
    assert trusted_throughputs([*HONEST, LOUD], {PEERS[3]})[PEERS[3]] == 1e12


def test_claims_below_the_median_are_taken_as_they_are() -> None:
    assert trusted_throughputs(HONEST, frozenset()) == {PEERS[0]: 1500.0, PEERS[1]: 1500.0, PEERS[2]: 1000.0}


def test_free_clients_skip_providers_that_require_tickets() -> None:
    paid = record(3, 0, 4, 1e12, requires_ticket=True)
    assert route([*HONEST, paid], free=True) == [(0, 0, 4)]
    assert route([paid], free=False) == [(3, 0, 4)]
    with pytest.raises(NoProvidersError, match="paid jobs only.*job ticket"):
        route([paid], free=True)


def test_bans_and_served_peers() -> None:
    bans = PeerBans()
    bans.succeeded(PEERS[0])
    assert bans.served() == {PEERS[0]}
    bans.failed(PEERS[0], now=0.0)
    assert bans.served() == frozenset() and PEERS[0] in bans.banned(now=1.0)


def test_requires_ticket_round_trips_and_is_type_checked() -> None:
    signed = sign_record(record(0, 0, 4, 10.0, requires_ticket=True), IDS[0])
    assert verify_signed_record(signed, subkey=PEERS[0]).requires_ticket is True
    raw = {**record(0, 0, 4, 10.0).__dict__, "maddrs": []}
    del raw["requires_ticket"]  # a record from an agent that predates the field
    assert ServerRecord.from_dict(raw).requires_ticket is False
    with pytest.raises(ProtocolError):
        ServerRecord.from_dict({**raw, "requires_ticket": 1})


def dht_record(value: bytes, subkey: str, expiration: float) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(block_key(MODEL, 0)).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=expiration,
    )


def test_a_record_asking_for_a_year_is_refused_by_dht_nodes_and_dropped_by_clients() -> None:
    year = 365 * 24 * 3600.0
    forever = record(0, 0, 4, 10.0, ttl=year)
    signed = sign_record(forever, IDS[0])
    assert not forever.lifetime_ok()
    assert not SignedRecordValidator().validate(dht_record(signed, PEERS[0], time.time() + year))
    # Even stored for a short while, its own claim of a year makes it invalid.
    assert not SignedRecordValidator().validate(dht_record(signed, PEERS[0], time.time() + 10))
    usual = record(0, 0, 4, 10.0, ttl=MAX_RECORD_TTL_S)
    assert usual.lifetime_ok()
    assert SignedRecordValidator().validate(dht_record(sign_record(usual, IDS[0]), PEERS[0], time.time() + 10))


def test_a_forged_body_with_a_valid_signature_of_another_peer_is_refused() -> None:
    body = msgpack.packb({**record(0, 0, 4, 10.0).__dict__, "maddrs": []}, use_bin_type=True)
    assert not SignedRecordValidator().validate(dht_record(body + IDS[1].sign(body), PEERS[0], time.time() + 10))
