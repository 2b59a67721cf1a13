"""The framing alone, on an in-memory stream: heads before tensors, memory as data arrives,
budgets, read deadlines, and the descriptor checks (the swarm tests attack a real agent)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.framing import Limits, encode_message, read_head, read_message, read_tensors


def stream(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def frames(header: dict, tensors: tuple = ()) -> bytes:
    return b"".join(bytes(f) for f in encode_message(header, tensors))


def head_only(shapes: list) -> bytes:
    head = msgpack.packb({"h": {}, "t": [["float32", s] for s in shapes]}, use_bin_type=True)
    return len(head).to_bytes(8, "big") + head


class Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.taken = limit, 0

    def take(self, nbytes: int) -> None:
        if self.taken + nbytes > self.limit:
            raise ProtocolError("over budget", code="busy")
        self.taken += nbytes


def test_zero_size_tensors_round_trip():
    empty = torch.empty(1, 0, 64)

    async def run():
        return await read_message(stream(frames({"a": 1}, (empty, torch.ones(2)))))

    message = asyncio.run(run())
    assert message.tensors[0].shape == (1, 0, 64) and torch.equal(message.tensors[1], torch.ones(2))


@pytest.mark.parametrize("shape", [[True, 3, 128], [1, False], [1.0, 2], [-1, 2], ["3"]])
def test_dimensions_must_be_non_negative_integers(shape):
    async def run():
        return await read_head(stream(head_only([shape])))

    with pytest.raises(ProtocolError) as error:
        asyncio.run(run())
    assert error.value.code == "bad_request"


def test_the_head_comes_before_the_tensors_and_declares_no_memory():
    async def run() -> int:
        reader = stream(head_only([[1024, 1024]]), eof=False)  # 4 MiB declared, none sent
        head = await read_head(reader)
        return head.nbytes

    assert asyncio.run(run()) == 4 * 1024 * 1024


def test_tensors_are_claimed_from_the_budget_as_they_arrive():
    tensor = torch.randn(4, 1024, 256)  # 4 MiB: four frames of 1 MiB

    async def run(budget: Budget):
        return await read_message(stream(frames({}, (tensor,))), Limits(max_tensor_bytes=1 << 30), budget)

    with pytest.raises(ProtocolError) as error:
        asyncio.run(run(Budget(3 << 20)))
    assert error.value.code == "busy"
    budget = Budget(4 << 20)
    message = asyncio.run(run(budget))
    assert torch.equal(message.tensors[0], tensor) and budget.taken == tensor.nbytes


def test_a_message_that_stops_midway_times_out():
    data = frames({}, (torch.randn(1, 8, 64),))

    async def run() -> None:
        reader = stream(data[:-100], eof=False)
        limits = Limits(read_timeout=0.2)
        head = await read_head(reader, limits)
        await read_tensors(reader, head, limits)

    with pytest.raises(ProtocolError) as error:
        asyncio.run(run())
    assert error.value.code == "timeout"
