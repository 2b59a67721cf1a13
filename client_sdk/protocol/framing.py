"""Framing of Hivemart messages on libp2p streams.

A *message* is a small msgpack header (a dict) followed by zero or more tensors. On the
wire it is a sequence of frames, each an 8-byte big-endian length and that many bytes:

    frame 0:  msgpack({"h": header, "t": [[dtype, shape], ...]})
    frame 1+: the tensors' raw bytes, concatenated and cut into frames of at most
              ``CHUNK_BYTES`` so that large activations stream without one huge buffer.

Every length, dtype, shape and count is checked against :class:`Limits` before anything
is allocated, so a malicious or buggy peer gets a :class:`ProtocolError`, never an
out-of-memory or a hang. Tensors travel uncompressed: on the links Hivemart targets the
(de)serialisation cost of compression exceeds what it saves for the small activations of
inference steps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import msgpack

from client_sdk.errors import ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = ["Limits", "Message", "read_message", "write_message", "encode_message", "CHUNK_BYTES"]

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


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: its header dict and its tensors, in order."""

    header: dict[str, Any]
    tensors: list["torch.Tensor"]


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def _wire_dtype(tensor: "torch.Tensor") -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _WIRE_DTYPES:
        raise ProtocolError(f"dtype {name} cannot be sent; use one of {', '.join(_WIRE_DTYPES)}")
    return name


def _tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move its bits as int16
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def encode_message(header: dict[str, Any], tensors: Sequence["torch.Tensor"] = ()) -> list[bytes | memoryview]:
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
    writer: asyncio.StreamWriter, header: dict[str, Any], tensors: Sequence["torch.Tensor"] = ()
) -> None:
    """Write one message and wait until the transport accepted it."""
    writer.writelines(encode_message(header, tensors))
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int, what: str) -> bytes:
    length = int.from_bytes(await reader.readexactly(HEADER_LEN), "big")
    if length > max_bytes:
        raise ProtocolError(f"{what} frame of {length} bytes exceeds the limit of {max_bytes}", code="too_large")
    return await reader.readexactly(length)


def _parse_descriptors(raw: Any, limits: Limits) -> list[tuple[str, tuple[int, ...], int]]:
    if not isinstance(raw, list) or len(raw) > limits.max_tensors:
        raise ProtocolError(f"a message carries a list of at most {limits.max_tensors} tensor descriptors")
    parsed = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in _WIRE_DTYPES and isinstance(item[1], list)):
            raise ProtocolError(f"bad tensor descriptor {item!r}: expected [dtype, shape] with dtype in {_WIRE_DTYPES}")
        dtype, shape = item
        if len(shape) > limits.max_rank or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
            raise ProtocolError(f"bad tensor shape {shape!r}: at most {limits.max_rank} non-negative dimensions")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _torch_dtype(dtype).itemsize
        if nbytes > limits.max_tensor_bytes:
            raise ProtocolError(f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}",
                                code="too_large")
        parsed.append((dtype, tuple(shape), nbytes))
    return parsed


async def read_message(reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Read and validate one message. Raises ProtocolError on malformed input and
    ``asyncio.IncompleteReadError`` when the stream ends (cleanly between messages or not)."""
    import torch

    head = await _read_frame(reader, limits.max_header_bytes, "header")
    try:
        decoded = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"message header is not valid msgpack: {e}") from e
    if not isinstance(decoded, dict) or not isinstance(decoded.get("h"), dict):
        raise ProtocolError("message header must be a map with a map under 'h'")
    descriptors = _parse_descriptors(decoded.get("t", []), limits)

    tensors = []
    for dtype, shape, nbytes in descriptors:
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        received = 0
        while received < nbytes:
            chunk = await _read_frame(reader, min(CHUNK_BYTES, nbytes - received), "tensor")
            if not chunk:
                raise ProtocolError("empty tensor frame")
            view[received : received + len(chunk)] = chunk
            received += len(chunk)
        wire = torch.int16 if dtype == "bfloat16" else _torch_dtype(dtype)
        tensor = torch.frombuffer(buffer, dtype=wire) if nbytes else torch.empty(0, dtype=wire)
        if dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        tensors.append(tensor.reshape(shape))
    return Message(decoded["h"], tensors)
