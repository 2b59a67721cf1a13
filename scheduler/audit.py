"""Deciding an audit: recompute a disputed span and see whose output agrees with it.

No Django here. A client that caught a provider's output (``claimed``) disagreeing with a
backup's (``reference``) on the same input files both, with the full prefix of hidden states
at the span's first block (``inputs``). The platform validator recomputes the span on CPU
in float32 from the reference checkpoint, takes the last positions (as many as ``claimed``
has), and compares each side with :func:`hivemart_core.protocol.verification.compare_outputs`
under the tolerance of the dtype the providers served:

| claimed | reference | verdict |
|---|---|---|
| mismatch | match | ``provider_cheated`` |
| match | mismatch | ``backup_cheated`` (informational: the reference is not signed by the backup) |
| match | match | ``reporter_wrong`` |
| mismatch | mismatch | ``inconclusive`` |

Malformed or inconsistent tensors (shapes that do not fit the span) are ``inconclusive``:
nothing can be concluded about the provider from them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.framing import Limits, read_message
from hivemart_core.protocol.verification import compare_outputs

__all__ = ["Verdict", "SpanComputer", "decode_tensor", "judge", "audit_span", "MAX_TENSOR_BYTES"]

MAX_TENSOR_BYTES = 8 * 1024 * 1024
_LIMITS = Limits(max_header_bytes=4096, max_tensors=1, max_tensor_bytes=MAX_TENSOR_BYTES, max_rank=3)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SpanComputer(Protocol):
    """What the validator needs: ``hivemart_core.models.backend.SpanBackend`` is one."""

    def forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Verdict:
    verdict: str
    detail: str


def decode_tensor(blob: bytes) -> torch.Tensor:
    """The one tensor of an ``encode_message({}, [tensor])`` byte string. Raises ProtocolError."""

    async def read() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(bytes(blob))
        reader.feed_eof()
        message = await read_message(reader, _LIMITS)
        if not reader.at_eof():
            raise ProtocolError("trailing bytes after the tensor message")
        return message

    try:
        message = asyncio.run(read())
    except asyncio.IncompleteReadError as e:
        raise ProtocolError("truncated tensor message") from e
    if len(message.tensors) != 1:
        raise ProtocolError(f"expected exactly one tensor, got {len(message.tensors)}")
    tensor = message.tensors[0]
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ProtocolError(f"hidden states are floating point, not {tensor.dtype}")
    return tensor


def judge(claimed_ok: bool, reference_ok: bool) -> str:
    """The verdict for the two comparisons (see the module's table)."""
    if claimed_ok:
        return "reporter_wrong" if reference_ok else "backup_cheated"
    return "provider_cheated" if reference_ok else "inconclusive"


def audit_span(
    computer: SpanComputer,
    *,
    start: int,
    end: int,
    dtype: str,
    hidden_size: int,
    inputs: bytes,
    claimed: bytes,
    reference: bytes,
) -> Verdict:
    """Recompute blocks [start, end) on ``inputs`` and judge ``claimed`` against ``reference``."""
    try:
        x, a, b = decode_tensor(inputs), decode_tensor(claimed), decode_tensor(reference)
    except ProtocolError as e:
        return Verdict("inconclusive", f"malformed tensors: {e}")
    if x.dim() != 3 or x.shape[-1] != hidden_size or x.shape[1] == 0:
        return Verdict(
            "inconclusive", f"inputs of shape {tuple(x.shape)} are not hidden states (batch, positions, {hidden_size})"
        )
    if (
        a.shape != b.shape
        or a.dim() != 3
        or a.shape[0] != x.shape[0]
        or a.shape[2] != hidden_size
        or not 0 < a.shape[1] <= x.shape[1]
    ):
        return Verdict(
            "inconclusive",
            f"claimed {tuple(a.shape)} and reference {tuple(b.shape)} do not fit inputs {tuple(x.shape)}",
        )
    with torch.inference_mode():
        recomputed = computer.forward(x.float(), start, end)[:, -a.shape[1] :, :]
    claimed_cmp = compare_outputs(a, recomputed, dtype=dtype)
    reference_cmp = compare_outputs(b, recomputed, dtype=dtype)
    return Verdict(
        judge(bool(claimed_cmp), bool(reference_cmp)), f"claimed {claimed_cmp!r}; reference {reference_cmp!r}"
    )
