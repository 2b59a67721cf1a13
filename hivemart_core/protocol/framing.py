"""Framing of Hivemart messages on libp2p streams.

A *message* is a small msgpack header (a dict) followed by zero or more tensors. On the
wire it is a sequence of frames, each an 8-byte big-endian length and that many bytes:

    frame 0:  msgpack({"h": header, "t": [[dtype, shape], ...]})
    frame 1+: the tensors' raw bytes, concatenated and cut into frames of at most
              ``CHUNK_BYTES`` so that large activations stream without one huge buffer.

Every length, dtype, shape and count is checked against :class:`Limits` before anything
is allocated, so a malicious or buggy peer gets a :class:`ProtocolError`, never an
out-of-memory or a hang. A reader can act on a message's head (:func:`read_head`: check a
ticket, say) before reading its tensors (:func:`read_tensors`), whose memory then grows
only as their bytes arrive, optionally claimed from a :class:`BufferBudget`; with
``Limits.read_timeout`` a message that has begun must keep arriving. Tensors travel uncompressed: on the links Hivemart targets the
(de)serialisation cost of compression exceeds what it saves for the small activations of
inference steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol import error_codes as codes

if TYPE_CHECKING:
    import torch

__all__ = [
    "Limits",
    "Message",
    "Head",
    "BufferBudget",
    "read_message",
    "read_head",
    "read_tensors",
    "write_message",
    "encode_message",
    "CHUNK_BYTES",
]

HEADER_LEN = 8
CHUNK_BYTES = 1 << 20

# Wire names of the dtypes Hivemart moves. Anything else is rejected.
_WIRE_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one message may carry."""

    max_header_bytes: int = 64 * 1024  # headers are small dicts; tickets and receipts fit easily
    max_tensors: int = 8
    max_tensor_bytes: int = 512 * 1024 * 1024
    max_rank: int = 4
    # Seconds a message that has begun may go without new bytes (None: no deadline).
    read_timeout: float | None = None


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: its header dict and its tensors, in order."""

    header: dict[str, Any]
    tensors: list[torch.Tensor]


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _wire_dtype(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _WIRE_DTYPES:
        raise ProtocolError(f"dtype {name} cannot be sent; use one of {', '.join(_WIRE_DTYPES)}")
    return name


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.numel() == 0:  # memoryview cannot cast a view with a zero in its shape
        return memoryview(b"")
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move its bits as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().data.cast("B")  # .data: numpy types ndarray as a Buffer only on Python >= 3.12


def encode_message(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[bytes | memoryview]:
    """The frames of a message, each with its length prefix, ready to be written."""
    descriptors = [[_wire_dtype(t), list(t.shape)] for t in tensors]
    head = msgpack.packb({"h": header, "t": descriptors}, use_bin_type=True)
    frames: list[bytes | memoryview] = [len(head).to_bytes(HEADER_LEN, "big"), head]
    for tensor in tensors:
        data = _tensor_bytes(tensor)
        for offset in range(0, len(data), CHUNK_BYTES):
            chunk = data[offset : offset + CHUNK_BYTES]
            frames.append(len(chunk).to_bytes(HEADER_LEN, "big"))
            frames.append(chunk)
    return frames


async def write_message(
    writer: asyncio.StreamWriter, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()
) -> None:
    """Write one message and wait until the transport accepted it."""
    writer.writelines(encode_message(header, tensors))
    await writer.drain()


class BufferBudget(Protocol):
    """Bytes a reader may still buffer: ``take`` claims ``nbytes`` more or raises
    :class:`ProtocolError` (code ``busy``) when that would exceed the budget."""

    def take(self, nbytes: int) -> None: ...


@dataclass
class Head:
    """The first frame of a message: its header and what its tensors will be (not read yet)."""

    header: dict[str, Any]
    descriptors: list[tuple[str, tuple[int, ...], int]]  # (wire dtype, shape, bytes) per tensor

    @property
    def nbytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.descriptors)

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype name, shape) of each tensor the message declares."""
        return [(dtype, shape) for dtype, shape, _ in self.descriptors]


async def _read_exactly(reader: asyncio.StreamReader, nbytes: int, timeout: float | None) -> bytes:
    if timeout is None:
        return await reader.readexactly(nbytes)
    try:
        async with asyncio.timeout(timeout):
            return await reader.readexactly(nbytes)
    except TimeoutError:
        raise ProtocolError(
            f"no data for {timeout:g} s in the middle of a message; send each message without pausing",
            code=codes.TIMEOUT,
        ) from None


async def _read_frame(
    reader: asyncio.StreamReader, max_bytes: int, what: str, timeout: float | None, *, first: bool = False
) -> bytes:
    # Waiting for a message to begin is the caller's business (an inference stream idles
    # between steps); once it has begun, every read has a deadline.
    length = int.from_bytes(await _read_exactly(reader, HEADER_LEN, None if first else timeout), "big")
    if length > max_bytes:
        raise ProtocolError(f"{what} frame of {length} bytes exceeds the limit of {max_bytes}", code=codes.TOO_LARGE)
    return await _read_exactly(reader, length, timeout)


def _parse_descriptors(raw: Any, limits: Limits) -> list[tuple[str, tuple[int, ...], int]]:
    if not isinstance(raw, list) or len(raw) > limits.max_tensors:
        raise ProtocolError(f"a message carries a list of at most {limits.max_tensors} tensor descriptors")
    parsed = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in _WIRE_DTYPES and isinstance(item[1], list)):
            raise ProtocolError(f"bad tensor descriptor {item!r}: expected [dtype, shape] with dtype in {_WIRE_DTYPES}")
        dtype, shape = item
        # type() and not isinstance(): a boolean is an int subclass and no dimension.
        if len(shape) > limits.max_rank or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
            raise ProtocolError(
                f"bad tensor shape {shape!r}: at most {limits.max_rank} non-negative integer dimensions"
            )
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _torch_dtype(dtype).itemsize
        if nbytes > limits.max_tensor_bytes:
            raise ProtocolError(
                f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}", code=codes.TOO_LARGE
            )
        parsed.append((dtype, tuple(shape), nbytes))
    return parsed


async def read_head(reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS) -> Head:
    """Read and validate the first frame of a message (its tensors follow: :func:`read_tensors`).
    Raises ProtocolError on malformed input and ``asyncio.IncompleteReadError`` when the
    stream ends."""
    head = await _read_frame(reader, limits.max_header_bytes, "header", limits.read_timeout, first=True)
    try:
        decoded = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"message header is not valid msgpack: {e}") from e
    if not isinstance(decoded, dict) or not isinstance(decoded.get("h"), dict):
        raise ProtocolError("message header must be a map with a map under 'h'")
    return Head(decoded["h"], _parse_descriptors(decoded.get("t", []), limits))


async def read_tensors(
    reader: asyncio.StreamReader, head: Head, limits: Limits = DEFAULT_LIMITS, budget: BufferBudget | None = None
) -> list[torch.Tensor]:
    """Read the tensors ``head`` declares. Memory grows as data arrives (a peer that declares
    a large tensor and sends nothing holds nothing), and every chunk is first claimed from
    ``budget`` when given."""
    import torch

    tensors = []
    for dtype, shape, nbytes in head.descriptors:
        buffer = bytearray()
        while len(buffer) < nbytes:
            chunk = await _read_frame(reader, min(CHUNK_BYTES, nbytes - len(buffer)), "tensor", limits.read_timeout)
            if not chunk:
                raise ProtocolError("empty tensor frame")
            if budget is not None:
                budget.take(len(chunk))
            buffer += chunk
        wire = torch.int16 if dtype == "bfloat16" else _torch_dtype(dtype)
        tensor = torch.frombuffer(buffer, dtype=wire) if nbytes else torch.empty(0, dtype=wire)
        if dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        tensors.append(tensor.reshape(shape))
    return tensors


async def read_message(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS, budget: BufferBudget | None = None
) -> Message:
    """Read and validate one message. Raises ProtocolError on malformed input and
    ``asyncio.IncompleteReadError`` when the stream ends (cleanly between messages or not)."""
    head = await read_head(reader, limits)
    return Message(head.header, await read_tensors(reader, head, limits, budget))
