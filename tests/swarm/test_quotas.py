"""What one peer can make an agent hold is bounded: streams, buffered bytes, sessions, cache.

One free agent with small quotas, attacked by a client that opens streams and sends heads
without data, stalls mid-message, or opens sessions without end; another client (its own
peer) is served meanwhile. Memory is measured on the agent process (psutil); waits are
deadlines on events, never timing assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
from hivemind.p2p import PeerID

from client_sdk.swarm.local import AgentProcess, LocalSwarm
from hivemart_core.errors import RemoteError
from hivemart_core.protocol.framing import read_message, write_message
from hivemart_core.protocol.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, OpenSession, SpanRequest
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm

MIB = 1024 * 1024
HIDDEN = 64
STREAMS_PER_PEER, IDLE_S, PEER_BUFFER_MB, SESSIONS_PER_PEER, PEER_CACHE_MB = 40, 10, 6, 3, 64


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(
        tiny_model,
        [(0, 4)],
        tmp_path_factory.mktemp("quotas"),
        extra_args=[
            "--max-streams-per-peer",
            str(STREAMS_PER_PEER),
            "--stream-idle-timeout",
            str(IDLE_S),
            "--peer-buffer-mb",
            str(PEER_BUFFER_MB),
            "--max-sessions-per-peer",
            str(SESSIONS_PER_PEER),
            "--peer-cache-mb",
            str(PEER_CACHE_MB),
        ],
    )
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def agent(swarm: LocalSwarm) -> AgentProcess:
    return swarm.agents[0]


@pytest.fixture(scope="module")
def attacker(swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(swarm.initial_peers) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def honest(swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(swarm.initial_peers) as runtime:  # another p2p daemon: another peer id
        yield runtime


def head_frame(header: dict, shapes: list[list], dtype: str = "float32") -> bytes:
    """The first frame of a message declaring tensors of ``shapes`` (their data not included)."""
    head = msgpack.packb({"h": header, "t": [[dtype, shape] for shape in shapes]}, use_bin_type=True)
    return len(head).to_bytes(8, "big") + head


def data_frame(nbytes: int) -> bytes:
    return nbytes.to_bytes(8, "big") + bytes(nbytes)


async def open_raw(runtime: SwarmRuntime, agent: AgentProcess, rpc: str, data: bytes = b""):
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(agent.peer_id), rpc)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def reply_or_end(reader: asyncio.StreamReader, timeout: float = 30) -> dict | None:
    """The next reply header, or None when the agent ended the stream without one."""
    try:
        return (await asyncio.wait_for(read_message(reader), timeout)).header
    except asyncio.IncompleteReadError:
        return None


def forward_ok(runtime: SwarmRuntime, agent: AgentProcess) -> None:
    output = runtime.run(ProviderConnection(runtime.p2p, agent.peer_id).forward(0, 4, torch.randn(1, 3, HIDDEN)))
    assert output.shape == (1, 3, HIDDEN) and torch.isfinite(output).all()


def rss_mib(agent: AgentProcess) -> float:
    return psutil.Process(agent.process.pid).memory_info().rss / MIB


def test_heads_without_data_pin_no_memory(attacker, agent):
    forward_ok(attacker, agent)
    before = rss_mib(agent)
    big = [1, 16384, HIDDEN]  # the largest request the agent allows: 4 MiB per tensor
    frame = head_frame(SpanRequest(0, 4).to_header(), [big, big])

    async def attack() -> float:
        streams = [await open_raw(attacker, agent, RPC_BACKWARD, frame) for _ in range(STREAMS_PER_PEER - 4)]
        try:
            await ProviderConnection(attacker.p2p, agent.peer_id).info()  # the heads were read by now
            return rss_mib(agent)
        finally:
            for _, writer in streams:
                writer.close()

    # 36 streams x 8 MiB declared: ~290 MiB if the agent allocated what the heads declare.
    assert attacker.run(attack()) - before < 100
    forward_ok(attacker, agent)


def test_a_peer_cannot_buffer_more_than_its_quota(attacker, honest, agent):
    shape = [1, 16384, HIDDEN]  # two tensors of 4 MiB: 8 MiB in flight, over the 6 MiB quota
    frame = head_frame(SpanRequest(0, 4).to_header(), [shape, shape])
    chunk = 1 << 20

    async def send_all() -> dict | None:
        reader, writer = await open_raw(attacker, agent, RPC_BACKWARD, frame)
        try:
            for _ in range(8):
                writer.write(data_frame(chunk))
                await writer.drain()
        except ConnectionError:
            pass  # the agent refused and closed: its reply is still to be read
        try:
            return await reply_or_end(reader)
        finally:
            writer.close()

    reply = attacker.run(send_all())
    assert reply is not None and (reply["type"], reply["code"]) == ("error", "busy"), reply
    forward_ok(attacker, agent)  # the quota was given back with the stream
    forward_ok(honest, agent)


def test_a_message_that_stalls_is_cut_off(attacker, agent):
    frame = head_frame(SpanRequest(0, 4).to_header(), [[1, 8, HIDDEN]]) + (1024).to_bytes(8, "big") + bytes(100)

    async def stall() -> dict | None:
        reader, writer = await open_raw(attacker, agent, RPC_FORWARD, frame)  # 100 of 1024 bytes, then nothing
        try:
            return await reply_or_end(reader, timeout=IDLE_S * 5)
        finally:
            writer.close()

    reply = attacker.run(stall())
    assert reply is not None and reply["code"] == "timeout", reply
    forward_ok(attacker, agent)


def test_idle_streams_are_capped_per_peer_timed_out_and_logged(attacker, honest, agent):
    async def slowloris() -> tuple[list[dict | None], list[dict | None]]:
        idle = [await open_raw(attacker, agent, RPC_FORWARD) for _ in range(STREAMS_PER_PEER)]
        extra = [await open_raw(attacker, agent, RPC_FORWARD) for _ in range(10)]
        try:
            refused = [await reply_or_end(reader) for reader, _ in extra]
            timed_out = [await reply_or_end(reader, timeout=IDLE_S * 5) for reader, _ in idle]
            return refused, timed_out
        finally:
            for _, writer in idle + extra:
                writer.close()

    refused, timed_out = attacker.run(slowloris())
    assert [r and r["code"] for r in refused] == ["busy"] * 10
    assert timed_out == [None] * STREAMS_PER_PEER  # the agent ended every stream that sent nothing
    assert "open streams, the most one peer may" in agent.log_tail(400)
    forward_ok(honest, agent)
    forward_ok(attacker, agent)  # its streams were given back


def test_another_client_is_served_while_one_peer_holds_all_its_streams(attacker, honest, agent):
    async def hold() -> list:
        return [await open_raw(attacker, agent, RPC_FORWARD) for _ in range(STREAMS_PER_PEER + 5)]

    streams = attacker.run(hold())
    try:
        forward_ok(honest, agent)
    finally:

        async def close() -> None:
            for _, writer in streams:
                writer.close()

        attacker.run(close())


async def open_session(
    runtime: SwarmRuntime, agent: AgentProcess, session_id: str, **spec: int
) -> tuple[dict, asyncio.StreamWriter]:
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(agent.peer_id), RPC_INFERENCE)
    await write_message(writer, OpenSession(session_id=session_id, start=0, end=4, **spec).to_header())
    return (await asyncio.wait_for(read_message(reader), 30)).header, writer


def test_sessions_and_cache_are_bounded_per_peer(attacker, honest, agent):
    async def open_many() -> list[tuple[dict, asyncio.StreamWriter]]:
        return [
            await open_session(attacker, agent, f"quota-session-{i}", max_length=16)
            for i in range(SESSIONS_PER_PEER + 1)
        ]

    async def honest_opens() -> tuple[str, str]:
        # 2048 x 64 tokens over 4 blocks reserve 128 MiB of cache (of 512 MiB): over one peer's 64 MiB.
        huge, huge_writer = await open_session(honest, agent, "huge-session-1", max_length=2048, batch_size=64)
        own, own_writer = await open_session(honest, agent, "honest-session", max_length=16)
        huge_writer.close(), own_writer.close()
        return huge.get("code", huge["type"]), own["type"]

    async def close(writers: list[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.close()

    opened = attacker.run(open_many())
    # The provider releases a session when it sees its stream end: sessions an earlier test of this
    # peer closed may still count for a moment. Wait for them (bounded), then check the limit.
    deadline = time.monotonic() + 15
    while opened[0][0].get("code") == "busy" and time.monotonic() < deadline:
        attacker.run(close([writer for _, writer in opened]))
        time.sleep(0.5)
        opened = attacker.run(open_many())
    try:
        assert [h.get("code", h["type"]) for h, _ in opened] == ["opened"] * SESSIONS_PER_PEER + ["busy"]
        assert honest.run(honest_opens()) == ("cache_full", "opened")  # another peer still gets a session
    finally:
        attacker.run(close([writer for _, writer in opened]))


def test_boolean_dimensions_are_bad_requests(attacker, agent):
    async def send() -> dict | None:
        frame = head_frame(SpanRequest(0, 4).to_header(), [[True, 3, HIDDEN]])
        reader, writer = await open_raw(attacker, agent, RPC_FORWARD, frame)
        try:
            return await reply_or_end(reader)
        finally:
            writer.close()

    reply = attacker.run(send())
    assert reply is not None and reply["code"] == "bad_request", reply
    forward_ok(attacker, agent)


def test_a_zero_size_tensor_gets_a_protocol_error(attacker, agent):
    connection = ProviderConnection(attacker.p2p, agent.peer_id)
    with pytest.raises(RemoteError) as error:
        attacker.run(connection.forward(0, 4, torch.empty(1, 0, HIDDEN)))
    assert error.value.code == "bad_shape"
    forward_ok(attacker, agent)
