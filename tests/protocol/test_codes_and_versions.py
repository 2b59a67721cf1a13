"""One table of error codes, used by every caller and sender; a protocol version in records,
info replies and RPC names, and routing that skips providers of other versions."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from client_sdk.swarm.routing import find_route
from hivemart_core.errors import NoProvidersError, ProtocolError
from hivemart_core.protocol import error_codes
from hivemart_core.protocol.error_codes import ERROR_CODES, Retry, is_provider_limit, is_ticket_error, retry_for
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.records import ServerRecord, ServerState, sign_record, verify_signed_record
from hivemart_core.protocol.rpc import LEGACY_RPC_NAMES, PROTOCOL_VERSION, RPC_FORWARD, RPC_INFO, rpc_name

ROOT = Path(__file__).resolve().parents[2]
SENDERS = [
    *sorted((ROOT / "provider_agent").rglob("*.py")),  # server/ included
    ROOT / "hivemart_core/models/adapters.py",
    ROOT / "hivemart_core/protocol/tickets.py",
    ROOT / "hivemart_core/protocol/framing.py",
]
# A code written as a string where an error is made: each must use the table's constants.
_LITERAL_CODE = re.compile(r'(?:RequestError|AdapterError|error_header)\(\s*"|code=\s*"|"code":\s*"')


def test_every_code_the_provider_sends_is_in_the_table() -> None:
    constants = {name for name in dir(error_codes) if name.isupper() and isinstance(getattr(error_codes, name), str)}
    assert {getattr(error_codes, n) for n in constants} == set(ERROR_CODES)
    used: set[str] = set()
    for path in SENDERS:
        source = path.read_text()
        assert not _LITERAL_CODE.search(source), f"{path} writes an error code as a string"
        used |= set(re.findall(r"\bcodes\.([A-Z_]+)\b", source))
    assert used <= constants, used - constants
    # What the codes were before the table: none got lost.
    assert {"next_hop_failed", "bad_push", "stale_step", "unknown_adapter", "ack_overdue", "bad_ack"} <= used_values(
        used
    )


def used_values(names: set[str]) -> set[str]:
    return {getattr(error_codes, n) for n in names}


def test_the_table_says_what_to_retry() -> None:
    assert retry_for("busy") is Retry.OTHER_PROVIDER and retry_for("next_hop_failed") is Retry.OTHER_PROVIDER
    assert retry_for("adapter_memory_full") is Retry.OTHER_PROVIDER
    assert retry_for("unknown_adapter") is Retry.SAME_PROVIDER
    assert retry_for("bad_shape") is Retry.NO and retry_for("a_code_from_the_future") is Retry.NO
    assert is_ticket_error("bad_ticket") and is_ticket_error("ticket_expired") and not is_ticket_error("busy")
    assert is_provider_limit("too_long") and not is_provider_limit("bad_request")


@pytest.mark.parametrize("module", ["client_sdk/swarm/session.py", "client_sdk/swarm/remote.py"])
def test_callers_keep_no_retry_lists_of_their_own(module: str) -> None:
    source = (ROOT / module).read_text()
    assert "_RETRYABLE" not in source and "retry_for(" in source
    for code in ERROR_CODES:
        assert f'"{code}"' not in source, f"{module} names {code!r} instead of using the table"


def test_rpc_names_carry_the_version_and_old_names_are_refused() -> None:
    assert RPC_INFO == f"hivemart.v{PROTOCOL_VERSION}.info" and RPC_FORWARD == rpc_name("forward")
    assert LEGACY_RPC_NAMES["hivemart.forward"] == 1 and RPC_FORWARD not in LEGACY_RPC_NAMES
    assert "LEGACY_RPC_NAMES" in (ROOT / "provider_agent/server/lifecycle.py").read_text()  # registered to refuse them


IDENTITY = Identity.generate()


def record(peer: Identity = IDENTITY, **changes: object) -> ServerRecord:
    base = ServerRecord(
        peer_id=peer.peer_id,
        model_id="tiny-model",
        start=0,
        end=4,
        state=ServerState.ONLINE,
        throughput=100.0,
        dtype="float32",
        cache_tokens_left=100,
        expires_at=time.time() + 60,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_version_is_signed_in_records_and_old_records_are_version_1() -> None:
    signed = sign_record(record(), IDENTITY)
    assert verify_signed_record(signed, subkey=IDENTITY.peer_id).protocol_version == PROTOCOL_VERSION
    body = msgpack.unpackb(signed[:-64], raw=False)
    body["protocol_version"] = PROTOCOL_VERSION + 1  # a relay cannot change what version it claims
    with pytest.raises(ProtocolError):
        verify_signed_record(msgpack.packb(body, use_bin_type=True) + signed[-64:], subkey=IDENTITY.peer_id)
    del body["protocol_version"]  # what a version 1 agent signed
    body_bytes = msgpack.packb(body, use_bin_type=True)
    old = verify_signed_record(body_bytes + IDENTITY.sign(body_bytes), subkey=IDENTITY.peer_id)
    assert old.protocol_version == 1
    for bad in (True, "2", 0):
        with pytest.raises(ProtocolError, match="protocol_version"):
            ServerRecord.from_dict({**body, "protocol_version": bad})


def test_records_of_another_version_are_not_routed_to() -> None:
    other, newer = Identity.generate(), Identity.generate()
    ours = record(other, throughput=1.0)
    loud = record(newer, throughput=1e12, protocol_version=PROTOCOL_VERSION + 1)
    hops = find_route([ours, loud], "tiny-model", 0, 4)
    assert [h.peer_id for h in hops] == [other.peer_id]
    with pytest.raises(
        NoProvidersError, match=f"speak protocol v{PROTOCOL_VERSION + 1}, this client v{PROTOCOL_VERSION}"
    ):
        find_route([loud, record(protocol_version=1)], "tiny-model", 0, 4)
