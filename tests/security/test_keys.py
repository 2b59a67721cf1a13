"""Ed25519 public keys are checked for small order and canonical encoding wherever a key
enters (issue 13, item 5): registration, job client keys, DHT records, tickets, receipts.

The forgery that motivated it: public key ``01`` + 31 zero bytes (the identity point) with
signature ``01`` + 63 zero bytes verifies for every message under plain RFC 8032 checks.
The small-order points are re-derived here with independent curve arithmetic, so the list
in ``hivemart_core.protocol.identity`` is checked, not trusted.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import (
    Identity,
    check_public_key,
    is_valid_public_key,
    peer_id_from_public_key,
    verify_signature,
)
from hivemart_core.protocol.receipts import ReceiptError, verify_receipt
from hivemart_core.protocol.records import ServerRecord, sign_record, verify_signed_record
from hivemart_core.protocol.tickets import NO_CLIENT_KEY, JobTicket, TicketError, issue_ticket, verify_ticket
from marketplace.jobs.models import Job
from marketplace.providers.models import Provider
from tests.marketplace.factories import make_model, make_user, make_wallet
from tests.marketplace.settlement import planned_job, platform
from tests.security.helpers import api, assert_error_shape

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P
IDENTITY_KEY = b"\x01" + bytes(31)
FORGED_SIGNATURE = b"\x01" + bytes(63)


# --- independent Edwards arithmetic (affine; slow and plain, which is the point) ---------------


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def _times(k: int, point: tuple[int, int]) -> tuple[int, int]:
    result = (0, 1)
    while k:
        if k & 1:
            result = _add(result, point)
        point, k = _add(point, point), k >> 1
    return result


def _decode(encoded: bytes) -> tuple[int, int] | None:
    """RFC 8032 decoding, lenient about y >= p (as a sloppy implementation would be)."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    sign = encoded[31] >> 7
    y %= P
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * pow(2, (P - 1) // 4, P) % P
    if x * x % P != x2:
        return None
    if x & 1 != sign:
        x = (P - x) % P
    return x, y


def _encode(point: tuple[int, int]) -> bytes:
    x, y = point
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _small_order_points() -> list[tuple[int, int]]:
    """The 8 torsion points: [L] times points on the curve, until 8 distinct ones are found."""
    found: set[tuple[int, int]] = set()
    y = 2
    while len(found) < 8:
        point = _decode(y.to_bytes(32, "little"))
        y += 1
        if point is not None:
            torsion = _times(L, point)
            for k in range(8):
                found.add(_times(k, torsion))
    return sorted(found)


SMALL_ORDER = [_encode(p) for p in _small_order_points()]
# Non-canonical encodings: y + p for small y (readable as y by a lenient decoder), and the
# sign bit set on the two points whose x is 0.
NON_CANONICAL = [(y + P).to_bytes(32, "little") for y in range(0, 19)] + [
    b"\x01" + bytes(30) + b"\x80",
    (P - 1).to_bytes(32, "little")[:31] + b"\xff",
]


def test_the_eight_small_order_points_are_the_known_ones() -> None:
    assert len(SMALL_ORDER) == 8
    for encoded in SMALL_ORDER:
        assert _times(8, _decode(encoded)) == (0, 1)
    assert IDENTITY_KEY in SMALL_ORDER
    assert bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05") in SMALL_ORDER
    assert bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f") in SMALL_ORDER


def test_the_forgery_verifies_under_plain_rfc8032_but_not_here() -> None:
    # The hole: OpenSSL (through cryptography) accepts it for any message.
    Ed25519PublicKey.from_public_bytes(IDENTITY_KEY).verify(FORGED_SIGNATURE, b"pay me everything")
    assert not verify_signature(IDENTITY_KEY, b"pay me everything", FORGED_SIGNATURE)


@pytest.mark.parametrize("key", SMALL_ORDER + NON_CANONICAL, ids=lambda k: k.hex()[:8] + ".." + k.hex()[-4:])
def test_small_order_and_non_canonical_keys_are_refused(key: bytes) -> None:
    with pytest.raises(ProtocolError):
        check_public_key(key)
    assert not is_valid_public_key(key)
    assert not verify_signature(key, b"message", FORGED_SIGNATURE)


def test_real_keys_pass_and_malformed_ones_do_not() -> None:
    for _ in range(20):
        identity = Identity.generate()
        assert check_public_key(identity.public_key) == identity.public_key
        assert verify_signature(identity.public_key, b"m", identity.sign(b"m"))
    assert not is_valid_public_key(b"\x05" * 31)
    assert not is_valid_public_key("01" * 32)  # type: ignore[arg-type]
    # A y with no curve point passes the key check but no signature verifies under it.
    off_curve = next(y.to_bytes(32, "little") for y in range(2, 100) if _decode(y.to_bytes(32, "little")) is None)
    assert not verify_signature(off_curve, b"message", FORGED_SIGNATURE)


def test_a_signature_with_a_small_order_r_is_refused() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"m")
    for r in SMALL_ORDER[:3]:
        assert not verify_signature(identity.public_key, b"m", r + signature[32:])


# --- entry points ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_provider_cannot_register_a_small_order_key_over_http() -> None:
    user, model = make_user(), make_model()
    for key in (IDENTITY_KEY, SMALL_ORDER[3], NON_CANONICAL[1]):
        challenge = api(user).post("/api/providers/challenge/", {}, format="json").json()["challenge"]
        response = api(user).post(
            "/api/providers/",
            {
                "peer_id": peer_id_from_public_key(key),
                "public_key": key.hex(),
                "challenge": challenge,
                "signature": FORGED_SIGNATURE.hex(),
                "model": model.model_id,
                "block_start": 0,
                "block_end": model.num_blocks,
                "price": 1_000,
            },
            format="json",
        )
        body = assert_error_shape(response, 400, "invalid")
        assert body["extra"]["field"] == "public_key"
    assert not Provider.objects.exists()


@pytest.mark.django_db
def test_a_job_cannot_name_a_small_order_client_key_over_http() -> None:
    user = make_wallet(credits=1_000_000).user
    model = make_model()
    for key in (IDENTITY_KEY, SMALL_ORDER[5], NON_CANONICAL[0]):
        response = api(user).post(
            "/api/jobs/",
            {
                "kind": "inference",
                "model": model.model_id,
                "budget": 1_000,
                "max_price": 1_000,
                "client_key": key.hex(),
            },
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"job-{key.hex()[:8]}",
        )
        body = assert_error_shape(response, 400, "invalid")
        assert body["extra"]["field"] == "client_key"
    assert not Job.objects.exists()
    good = Identity.generate().public_key.hex()
    response = api(user).post(
        "/api/jobs/",
        {"kind": "inference", "model": model.model_id, "budget": 1_000, "max_price": 1_000, "client_key": good},
        format="json",
        HTTP_IDEMPOTENCY_KEY="job-good",
    )
    assert response.status_code == 201, response.json()


def test_a_dht_record_under_a_small_order_peer_id_is_refused() -> None:
    peer_id = peer_id_from_public_key(IDENTITY_KEY)
    record = ServerRecord(
        peer_id=peer_id,
        model_id="m",
        start=0,
        end=4,
        state="online",
        throughput=1e9,
        dtype="float32",
        cache_tokens_left=1,
        expires_at=2.0**40,
        maddrs=("/ip4/127.0.0.1/tcp/1",),
    )
    body = msgpack.packb({**asdict(record), "maddrs": list(record.maddrs)}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="not signed"):
        verify_signed_record(body + FORGED_SIGNATURE, subkey=peer_id)
    # An honest peer's record still verifies.
    honest = Identity.generate()
    record = replace(record, peer_id=honest.peer_id)
    assert verify_signed_record(sign_record(record, honest), subkey=honest.peer_id) == record


def _ticket_body(**overrides: object) -> dict:
    body = dict(
        ticket_id="ticket-0001",
        job_id=1,
        client_key=Identity.generate().public_key.hex(),
        provider_peer=Identity.generate().peer_id,
        model_id="m",
        model_digest="ab" * 32,
        start=0,
        end=4,
        max_units=1_000,
        credit_units=100,
        price=1_000,
        expires_at=2**40,
    )
    body.update(overrides)
    return body


def test_tickets_refuse_a_small_order_client_key_and_platform_key() -> None:
    for key in (IDENTITY_KEY, SMALL_ORDER[6], NON_CANONICAL[2]):
        ticket = issue_ticket(platform(), **_ticket_body(client_key=NO_CLIENT_KEY)).to_dict()
        ticket["client_key"] = key.hex()
        with pytest.raises(TicketError) as e:
            JobTicket.from_dict(ticket)
        assert e.value.code == "bad_ticket"
    # A ticket "signed" by a small-order platform key with the forged signature.
    forged = {**_ticket_body(), "signature": FORGED_SIGNATURE.hex()}
    with pytest.raises(TicketError) as e:
        verify_ticket(forged, platform_key=IDENTITY_KEY)
    assert e.value.code == "ticket_signature"
    # The explicit "no client key" marker still parses: nothing countersigns against it.
    assert JobTicket.from_dict(issue_ticket(platform(), **_ticket_body(client_key=NO_CLIENT_KEY)).to_dict())


@pytest.mark.django_db
def test_receipts_with_forged_signatures_by_small_order_keys_are_refused() -> None:
    pj = planned_job(backups=0)
    provider = pj.providers[0]
    ticket = JobTicket.from_dict(pj.ticket(provider).signed)
    receipt = pj.receipt(provider, 1_000, countersigned=False)
    # A ticket naming the identity point as client key (as the marketplace did before keys
    # were checked): a forged countersignature must not verify against it.
    weak_client = JobTicket(**{**ticket.to_dict(), "client_key": IDENTITY_KEY.hex()})
    data = {**receipt.to_dict(), "client_signature": FORGED_SIGNATURE.hex()}
    with pytest.raises(ReceiptError) as e:
        verify_receipt(data, weak_client)
    assert e.value.code == "client_signature"
    # A receipt under a small-order provider peer id with the forged signature.
    weak_peer = peer_id_from_public_key(IDENTITY_KEY)
    weak_ticket = JobTicket(**{**ticket.to_dict(), "provider_peer": weak_peer})
    data = {**receipt.to_dict(), "provider_peer": weak_peer, "provider_signature": FORGED_SIGNATURE.hex()}
    with pytest.raises(ReceiptError) as e:
        verify_receipt(data, weak_ticket)
    assert e.value.code == "receipt_signature"
