"""Reading and writing signed server records in the hivemind DHT."""

from __future__ import annotations

import time
from collections.abc import Iterable

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import (
    CLOCK_SLACK_S,
    MAX_RECORD_TTL_S,
    ServerRecord,
    block_key,
    sign_record,
    verify_record,
    verify_signed_record,
)

__all__ = ["announce_span", "fetch_span_records", "SignedRecordValidator"]

logger = get_logger(__name__)

_MAX_SPAN_BLOCKS = 1024


class SignedRecordValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped: its base class is Any
    """Makes every DHT node of the swarm refuse to store or return a server record that is
    not signed by the peer id it is stored under, that describes another key, or that asks
    to live longer than it says or than :data:`MAX_RECORD_TTL_S`. Without it, anyone could
    overwrite a provider's record (its subkey) with a forged one, even if clients would later
    drop the forgery, and a record could be kept alive for a year past its withdrawal.
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            if not isinstance(subkey, str):
                return False
            parsed = verify_signed_record(value, subkey=subkey)
        except Exception:  # anything malformed is simply invalid
            return False
        if record.expiration_time > parsed.expires_at + CLOCK_SLACK_S:
            return False
        if not parsed.lifetime_ok() or record.expiration_time > get_dht_time() + MAX_RECORD_TTL_S + CLOCK_SLACK_S:
            return False
        if parsed.end - parsed.start > _MAX_SPAN_BLOCKS:
            return False
        return any(
            DHTID.generate(block_key(parsed.model_id, i)).to_bytes() == record.key
            for i in range(parsed.start, parsed.end)
        )


async def announce_span(node: DHTNode, identity: Identity, record: ServerRecord) -> bool:
    """Store ``record`` under every block of its span; True when every store succeeded.

    A DHT node keeps, per subkey, the value with the latest expiration and refuses older
    ones, so a record replaces the previous one only if it expires later: callers that
    change a record (going offline, say) must give it a later ``expires_at``.
    """
    ttl = record.expires_at - time.time()
    if ttl > MAX_RECORD_TTL_S:
        raise ValueError(f"a record may live at most {MAX_RECORD_TTL_S:.0f} s, not {ttl:.0f} s")
    value = sign_record(record, identity)
    # The DHT's clock is wall-clock time; records carry the same absolute expiry.
    expiration = get_dht_time() + max(1.0, ttl)
    keys = [block_key(record.model_id, i) for i in range(record.start, record.end)]
    results = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[identity.peer_id] * len(keys))
    return all(results.values())


async def fetch_span_records(node: DHTNode, model_id: str, blocks: Iterable[int]) -> dict[str, ServerRecord]:
    """Live, correctly signed records of every peer serving any of ``blocks``, by peer id.

    Unsigned, mis-signed, expired and offline records are dropped here, so a forged record
    for someone else's peer id never reaches routing; so are records that claim a lifetime
    beyond :data:`MAX_RECORD_TTL_S` (whatever DHT node served them).
    """
    blocks = list(blocks)
    found = await node.get_many([block_key(model_id, i) for i in blocks], sufficient_expiration_time=float("inf"))
    records: dict[str, ServerRecord] = {}
    now = time.time()
    for block in blocks:
        entry = found.get(block_key(model_id, block))
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            try:
                record = verify_record(item.value, subkey=str(subkey), model_id=model_id, block=block)
            except ProtocolError as e:
                logger.debug(f"dropping a record for block {block} under {subkey!r}: {e}")
                continue
            if not record.lifetime_ok(now):
                logger.debug(f"dropping a record for block {block} under {subkey!r}: it asks to live too long")
                continue
            if record.is_live(now):
                records[record.peer_id] = record
    return records
