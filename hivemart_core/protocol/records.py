"""Signed server records announced in the DHT.

A provider announces, for every block ``i`` it serves, a record under the DHT key
``"{model_id}.{i}"`` with its peer id as subkey. The value is
``msgpack(record) || ed25519_signature(msgpack(record))``. Ed25519 peer ids embed their
public key, so anyone can check a record against the subkey it is stored under: a peer
cannot announce for another peer id, and a record that fails the check is dropped.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import Identity, public_key_from_peer_id, verify_signature
from hivemart_core.protocol.rpc import PROTOCOL_VERSION

__all__ = [
    "ServerRecord",
    "ServerState",
    "block_key",
    "sign_record",
    "verify_record",
    "verify_signed_record",
    "MODEL_ID_PATTERN",
    "MAX_RECORD_TTL_S",
    "CLOCK_SLACK_S",
]

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SIGNATURE_LEN = 64
_MAX_RECORD_BYTES = 4096
# The longest a record may say it stays valid. A provider re-announces every few seconds, so
# a long lifetime buys it nothing but lets a record outlive the provider (or its withdrawal)
# for that long; records that ask for more are refused by DHT nodes and dropped by clients.
MAX_RECORD_TTL_S = 300.0
# Peers' clocks differ slightly: expiry checks allow this much.
CLOCK_SLACK_S = 30.0


class ServerState:
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"
    ALL = (JOINING, ONLINE, DRAINING, OFFLINE)


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.{index}"


@dataclass(frozen=True)
class ServerRecord:
    """What a provider says about itself. ``throughput`` is tokens per second through one
    block; ``expires_at`` is wall-clock seconds, also enforced by the DHT, at most
    :data:`MAX_RECORD_TTL_S` ahead. ``requires_ticket``: the provider serves only paid jobs
    (a job ticket on every session), so free clients route around it. ``protocol_version``:
    the wire protocol the provider speaks (signed with the rest; a record without it is from
    a version 1 agent); clients route only to versions they speak."""

    peer_id: str
    model_id: str
    start: int
    end: int
    state: str
    throughput: float
    dtype: str
    cache_tokens_left: int
    expires_at: float
    maddrs: tuple[str, ...] = ()
    requires_ticket: bool = False
    protocol_version: int = PROTOCOL_VERSION

    def is_live(self, now: float | None = None) -> bool:
        return self.state == ServerState.ONLINE and self.expires_at > (time.time() if now is None else now)

    def lifetime_ok(self, now: float | None = None) -> bool:
        """False when the record asks to stay valid longer than :data:`MAX_RECORD_TTL_S`
        (with clock slack): its signer wants it to outlive any withdrawal."""
        return self.expires_at <= (time.time() if now is None else now) + MAX_RECORD_TTL_S + CLOCK_SLACK_S

    @classmethod
    def from_dict(cls, raw: Any) -> ServerRecord:
        if not isinstance(raw, dict):
            raise ProtocolError("a server record must be a map")
        try:
            record = cls(
                peer_id=str(raw["peer_id"]),
                model_id=str(raw["model_id"]),
                start=raw["start"],
                end=raw["end"],
                state=raw["state"],
                throughput=raw["throughput"],
                dtype=str(raw["dtype"]),
                cache_tokens_left=raw["cache_tokens_left"],
                expires_at=raw["expires_at"],
                maddrs=tuple(str(m) for m in raw.get("maddrs", ())[:8]),
                requires_ticket=raw.get("requires_ticket", False),  # absent in records of older agents
                protocol_version=raw.get("protocol_version", 1),  # absent in records of version 1 agents
            )
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"a server record is missing or mistypes a field: {e}") from e
        if not (type(record.start) is int and type(record.end) is int and 0 <= record.start < record.end):
            raise ProtocolError(f"bad span {record.start}:{record.end} in a server record")
        if record.state not in ServerState.ALL:
            raise ProtocolError(f"bad state {record.state!r} in a server record")
        if not (
            isinstance(record.throughput, (int, float)) and math.isfinite(record.throughput) and record.throughput >= 0
        ):
            raise ProtocolError("a server record's throughput must be a finite non-negative number")
        if not isinstance(record.expires_at, (int, float)) or not math.isfinite(record.expires_at):
            raise ProtocolError("a server record's expires_at must be a number")
        if type(record.requires_ticket) is not bool:
            raise ProtocolError("a server record's requires_ticket must be a boolean")
        if type(record.protocol_version) is not int or not 1 <= record.protocol_version <= 2**16:
            raise ProtocolError("a server record's protocol_version must be a positive integer")
        if type(record.cache_tokens_left) is not int or record.cache_tokens_left < 0:
            raise ProtocolError("a server record's cache_tokens_left must be a non-negative integer")
        if not MODEL_ID_PATTERN.match(record.model_id):
            raise ProtocolError("bad model id in a server record")
        return record


def sign_record(record: ServerRecord, identity: Identity) -> bytes:
    if record.peer_id != identity.peer_id:
        raise ProtocolError("a record can only be signed by the peer it describes")
    body: bytes = msgpack.packb({**asdict(record), "maddrs": list(record.maddrs)}, use_bin_type=True)
    return body + identity.sign(body)


def verify_signed_record(value: Any, *, subkey: str) -> ServerRecord:
    """Parse a DHT value stored under ``subkey`` and check that it is signed by that peer's
    key and describes that peer (not yet which model or block it is stored for)."""
    if not isinstance(value, bytes) or not _SIGNATURE_LEN < len(value) <= _MAX_RECORD_BYTES:
        raise ProtocolError("a server record must be signed bytes of bounded size")
    body, signature = value[:-_SIGNATURE_LEN], value[-_SIGNATURE_LEN:]
    if not verify_signature(public_key_from_peer_id(subkey), body, signature):
        raise ProtocolError(f"record under {subkey} is not signed by that peer")
    try:
        raw = msgpack.unpackb(body, raw=False)
    except Exception as e:
        raise ProtocolError(f"record body is not msgpack: {e}") from e
    record = ServerRecord.from_dict(raw)
    if record.peer_id != subkey:
        raise ProtocolError(f"record under {subkey} describes another peer")
    return record


def verify_record(value: Any, *, subkey: str, model_id: str, block: int) -> ServerRecord:
    """Parse a DHT value stored under ``(block_key(model_id, block), subkey)`` and check that
    it is signed by ``subkey``'s key and describes that peer, model and block."""
    record = verify_signed_record(value, subkey=subkey)
    if record.model_id != model_id or not record.start <= block < record.end:
        raise ProtocolError(f"record under {subkey} describes another model or block")
    return record
