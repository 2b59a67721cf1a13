"""Ed25519 identities shared by libp2p and Hivemart.

A provider's signing key *is* its libp2p identity: the key file is written in libp2p's
``PrivateKey`` protobuf encoding so that p2pd loads it (``-id FILE``), and the peer id that
p2pd announces is derived from the same public key. Anyone holding a public key can
therefore check that it belongs to a peer id, and that a record or receipt was signed by
that peer, without trusting the sender.

libp2p encodings used here (see the libp2p peer-id spec):
- ``PrivateKey``/``PublicKey`` protobuf: field 1 (varint) key type, 1 = Ed25519; field 2
  (bytes) key data: 64 bytes (seed + public key) for a private key, 32 for a public key.
- Peer id: the identity multihash (code 0x00) of the 36-byte ``PublicKey`` protobuf,
  written in base58btc (such ids start with ``12D3KooW``).

Every public key that arrives from elsewhere (a registration, a job's client key, a DHT
record's peer id, a ticket, a receipt) passes :func:`check_public_key`: a key of small order
(one of the 8 points of the curve's torsion subgroup) verifies forged signatures (public key
``01`` + 31 zero bytes with signature ``01`` + 63 zero bytes verifies for any message), and a
non-canonical encoding (y >= p) names a point that some implementations read differently.
:func:`verify_signature` applies the same check to the key and to the signature's R.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from hivemart_core.errors import ProtocolError

__all__ = [
    "Identity",
    "check_public_key",
    "is_valid_public_key",
    "peer_id_from_public_key",
    "verify_signature",
    "public_key_from_peer_id",
]

_ED25519 = 1
_PUBLIC_KEY_LEN = 32
_SIGNATURE_LEN = 64

# The field of edwards25519; a point is encoded as y (255 bits, little-endian) and x's sign.
_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1
# The y coordinates of the curve's 8 points of small order: the identity (1), the point of
# order 2 (-1), the two of order 4 (0) and the four of order 8 (two values of y, each with
# both signs of x). A canonical key with any of these y is of small order, and no other is.
_ORDER_8_Y = int.from_bytes(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
_SMALL_ORDER_Y = frozenset({1, _P - 1, 0, _ORDER_8_Y, _P - _ORDER_8_Y})


def _decoded_y(encoded: bytes) -> int | None:
    """The y coordinate of a point's 32-byte encoding; None when it is not canonical (y >= p)."""
    y = int.from_bytes(encoded, "little") & _Y_MASK
    return y if y < _P else None


def _key_problem(public_key: bytes) -> str | None:
    if len(public_key) != _PUBLIC_KEY_LEN:
        return f"an Ed25519 public key has {_PUBLIC_KEY_LEN} bytes"
    y = _decoded_y(public_key)
    if y is None:
        return "the Ed25519 public key is not canonically encoded (y >= p)"
    if y in _SMALL_ORDER_Y:
        return "the Ed25519 public key is a point of small order (it would verify forged signatures)"
    # A y with no curve point is left to the signature check, which no signature passes.
    return None


def check_public_key(public_key: bytes) -> bytes:
    """``public_key`` (as bytes) when it is a usable Ed25519 public key: 32 bytes, canonically
    encoded (y < p), not of small order. ProtocolError otherwise; every key that arrives from
    elsewhere goes through here."""
    if not isinstance(public_key, (bytes, bytearray)):
        raise ProtocolError(f"an Ed25519 public key is {_PUBLIC_KEY_LEN} bytes")
    problem = _key_problem(bytes(public_key))
    if problem is not None:
        raise ProtocolError(problem)
    return bytes(public_key)


def is_valid_public_key(public_key: bytes) -> bool:
    """Whether :func:`check_public_key` accepts ``public_key``."""
    return isinstance(public_key, (bytes, bytearray)) and _key_problem(bytes(public_key)) is None


def _protobuf_key(key_type: int, data: bytes) -> bytes:
    # Both fields are small: a one-byte tag, a one-byte varint length suffices for <= 127 bytes.
    return bytes([0x08, key_type, 0x12, len(data)]) + data


def _parse_protobuf_key(blob: bytes) -> tuple[int, bytes]:
    if len(blob) < 4 or blob[0] != 0x08 or blob[2] != 0x12 or blob[3] != len(blob) - 4:
        raise ProtocolError("not a libp2p key protobuf with a single-byte key length")
    return blob[1], blob[4:]


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58btc) of a raw 32-byte Ed25519 public key."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != _PUBLIC_KEY_LEN:
        raise ProtocolError(f"an Ed25519 public key has {_PUBLIC_KEY_LEN} bytes")
    encoded = _protobuf_key(_ED25519, bytes(public_key))
    return base58.b58encode(bytes([0x00, len(encoded)]) + encoded).decode()


@functools.lru_cache(maxsize=4096)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key embedded in an Ed25519 peer id (ProtocolError for others).
    It is not checked here: :func:`verify_signature` refuses every signature by a weak key."""
    try:
        multihash = base58.b58decode(peer_id)
    except ValueError as e:
        raise ProtocolError(f"peer id {peer_id!r} is not base58") from e
    if len(multihash) < 2 or multihash[0] != 0x00 or multihash[1] != len(multihash) - 2:
        raise ProtocolError(f"peer id {peer_id!r} does not embed its public key (not an Ed25519 peer id)")
    key_type, data = _parse_protobuf_key(multihash[2:])
    if key_type != _ED25519 or len(data) != _PUBLIC_KEY_LEN:
        raise ProtocolError(f"peer id {peer_id!r} is not an Ed25519 peer id")
    return data


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    False for a key :func:`check_public_key` refuses, and for a signature whose R is not
    canonical or of small order (no honest signer makes one; OpenSSL checks S < L itself)."""
    if not is_valid_public_key(public_key) or len(signature) != _SIGNATURE_LEN:
        return False
    r = _decoded_y(bytes(signature[:32]))
    if r is None or r in _SMALL_ORDER_Y:
        return False
    try:
        _public_key(bytes(public_key)).verify(bytes(signature), bytes(message))
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _public_key(public_key: bytes) -> Ed25519PublicKey:
    # Step records are checked for every hop of every token, by a handful of peers: decoding
    # their keys once saves a tenth of each check.
    return Ed25519PublicKey.from_public_bytes(public_key)


class Identity:
    """An Ed25519 key pair: signs messages and names a libp2p peer."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests, the demo's platform key)."""
        if len(seed) != 32:
            raise ProtocolError("an Ed25519 seed has 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file in libp2p's protobuf encoding."""
        blob = Path(path).read_bytes()
        key_type, data = _parse_protobuf_key(blob)
        if key_type != _ED25519 or len(data) != 64:
            raise ProtocolError(f"{path} is not an Ed25519 libp2p private key; delete it to generate a new identity")
        return cls.from_seed(data[:32])

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity at ``path``, creating it (mode 0600) when the file does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.to_libp2p_bytes())

    def to_libp2p_bytes(self) -> bytes:
        seed = self._private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return _protobuf_key(_ED25519, seed + self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"
