"""Malformed requests get a clear error and the agent keeps serving correct ones."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import PeerID

from client_sdk.swarm.local import LocalSwarm
from hivemart_core.errors import RemoteError
from hivemart_core.protocol.commitments import StepRecord, digest_hex, equivocation
from hivemart_core.protocol.framing import read_message, write_message
from hivemart_core.protocol.rpc import RPC_FORWARD, RPC_INFERENCE, RPC_INFO, RPC_PUSH, OpenSession, Step
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import wait_for

pytestmark = pytest.mark.swarm

HIDDEN = 64


@pytest.fixture(scope="module")
def first_agent(two_provider_swarm: LocalSwarm):
    return two_provider_swarm.agents[0]  # serves blocks 0:2


def hidden(tokens: int = 3, *, size: int = HIDDEN, dtype: torch.dtype = torch.float32, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(tokens)).to(dtype)


async def raw_exchange(
    runtime: SwarmRuntime, peer_id: str, rpc: str, frames: list[bytes], replies: int = 1
) -> list[dict]:
    """Write raw bytes on a fresh stream and read the reply headers."""
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), rpc)
    try:
        writer.writelines(frames)
        await writer.drain()
        return [(await asyncio.wait_for(read_message(reader), 10)).header for _ in range(replies)]
    finally:
        writer.close()


def assert_still_serves(runtime: SwarmRuntime, peer_id: str) -> None:
    """A correct forward right after the bad request is answered correctly."""
    connection = ProviderConnection(runtime.p2p, peer_id)
    output = runtime.run(connection.forward(0, 2, hidden()))
    assert output.shape == (1, 3, HIDDEN) and torch.isfinite(output).all()
    session = runtime.run(_open(runtime, peer_id, "check-session-" + str(id(output))))
    assert session["type"] == "opened"


async def _open(runtime: SwarmRuntime, peer_id: str, session_id: str, **overrides) -> dict:
    spec = dict(session_id=session_id, start=0, end=2, max_length=16)
    spec.update(overrides)
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), RPC_INFERENCE)
    try:
        await write_message(writer, OpenSession(**spec).to_header())
        return (await read_message(reader)).header
    finally:
        writer.close()


def test_info_describes_the_span(runtime2, first_agent):
    info = runtime2.run(ProviderConnection(runtime2.p2p, first_agent.peer_id).info())
    assert (info["start"], info["end"], info["dtype"], info["hidden_size"]) == (0, 2, "float32", HIDDEN)
    assert info["model_id"] == first_agent.ready["model_id"]
    assert len(info["block_digests"]) == 2 and all(len(d) == 64 for d in info["block_digests"])
    assert info["cache_tokens_left"] > 0 and info["max_session_length"] > 0


@pytest.mark.parametrize(
    "tensor, blocks, code",
    [
        (hidden(size=HIDDEN + 1), (0, 2), "bad_shape"),
        (hidden(dtype=torch.float16), (0, 2), "bad_dtype"),
        (hidden()[0], (0, 2), "bad_shape"),
        (hidden(), (1, 3), "bad_span"),
        (hidden(), (2, 4), "bad_span"),
        (hidden(tokens=20000), (0, 2), "too_large"),
        (torch.full((1, 2, HIDDEN), float("nan")), (0, 2), "bad_value"),
    ],
    ids=["hidden-size", "dtype", "rank", "span-overlap", "span-outside", "too-many-tokens", "nan"],
)
def test_bad_forward_requests_are_refused(runtime2, first_agent, tensor, blocks, code):
    connection = ProviderConnection(runtime2.p2p, first_agent.peer_id)
    with pytest.raises(RemoteError) as error:
        runtime2.run(connection.forward(*blocks, tensor))
    assert error.value.code == code, error.value
    assert_still_serves(runtime2, first_agent.peer_id)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"\x00\x00\x00\x00\x00\x00\x00\x05hello"], "bad_request"),
        ([b"\xff" * 8], "too_large"),
        ([b"\x00\x00\x00\x00\x00\x00\x00\x03\x81\xa1h"], "bad_request"),
    ],
    ids=["garbage-msgpack", "huge-length", "truncated-map"],
)
def test_garbage_bytes_get_an_error(runtime2, first_agent, frames, code):
    (reply,) = runtime2.run(raw_exchange(runtime2, first_agent.peer_id, RPC_FORWARD, frames))
    assert reply["type"] == "error" and reply["code"] == code
    assert_still_serves(runtime2, first_agent.peer_id)


def test_bad_session_openings_are_refused(runtime2, first_agent):
    peer = first_agent.peer_id
    assert runtime2.run(_open(runtime2, peer, "too-long-session", max_length=10**6))["code"] == "too_long"
    assert runtime2.run(_open(runtime2, peer, "outside-span-1", start=1, end=3))["code"] == "bad_span"
    assert runtime2.run(_open(runtime2, peer, "huge-batch-1", batch_size=10**6))["code"] == "too_large"
    (reply,) = runtime2.run(raw_exchange(runtime2, peer, RPC_INFERENCE, [_frames({"type": "open", "session_id": "x"})]))
    assert reply["code"] == "bad_request"
    assert_still_serves(runtime2, peer)


def _frames(header: dict, tensors: tuple = ()) -> bytes:
    from hivemart_core.protocol.framing import encode_message

    return b"".join(bytes(f) for f in encode_message(header, tensors))


async def _session_steps(
    runtime: SwarmRuntime,
    peer_id: str,
    steps: list[tuple[dict, torch.Tensor]],
    *,
    session_id: str = "steps-session-1",
    with_tensors: bool = False,
) -> list:
    """Open a session, send each (step header, tensor), return each reply header (or message)."""
    _, reader, writer = await runtime.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), RPC_INFERENCE)
    try:
        await write_message(writer, OpenSession(session_id=session_id, start=0, end=2, max_length=8).to_header())
        opened = (await read_message(reader)).header
        if opened["type"] != "opened":
            raise RemoteError(opened.get("code", "?"), opened.get("message", ""), peer_id=peer_id)
        replies = []
        for header, tensor in steps:
            await write_message(writer, header, (tensor,))
            reply = await asyncio.wait_for(read_message(reader), 10)
            replies.append(reply if with_tensors else reply.header)
        return replies
    finally:
        writer.close()


def test_bad_steps_are_refused_and_the_session_goes_on(runtime2, first_agent):
    def step(step_id: int, position: int, session_id: str = "steps-session-1") -> dict:
        return {"type": "step", "session_id": session_id, "step_id": step_id, "position": position}

    replies = runtime2.run(
        _session_steps(
            runtime2,
            first_agent.peer_id,
            [
                (step(0, 0), hidden(3)),  # fine: positions 0..2
                (step(1, 5), hidden(1)),  # skips positions 3 and 4
                ({**step(2, 0), "position": -1}, hidden(1)),  # negative position
                (step(3, 3), hidden(6)),  # beyond max_length 8
                (step(4, 3), hidden(1, size=HIDDEN - 1)),  # wrong hidden size
                (step(5, 3), hidden(1, dtype=torch.bfloat16)),  # wrong dtype
                (step(6, 3, session_id="another-session"), hidden(1)),  # a session this stream does not serve
                (step(7, 3), hidden(1)),  # fine: position 3
                (step(7, 3), hidden(1)),  # re-sent: answered again, not applied twice
                (step(8, 1), hidden(1)),  # rollback to position 1: fine
            ],
        )
    )
    codes = [r.get("code", r["type"]) for r in replies]
    assert codes == [
        "output",
        "bad_position",
        "bad_request",
        "too_long",
        "bad_shape",
        "bad_dtype",
        "unknown_session",
        "output",
        "output",
        "output",
    ]
    assert replies[7]["step_id"] == replies[8]["step_id"] == 7
    assert_still_serves(runtime2, first_agent.peer_id)


def test_every_output_carries_a_signed_record_and_a_step_is_never_computed_twice(runtime2, first_agent):
    session = "records-session-1"

    def step(step_id: int, position: int) -> dict:
        return {"type": "step", "session_id": session, "step_id": step_id, "position": position}

    sent = [hidden(3), hidden(1), hidden(1), hidden(1)]
    replies = runtime2.run(
        _session_steps(
            runtime2,
            first_agent.peer_id,
            [
                (step(10, 0), sent[0]),
                (step(11, 3), sent[1]),
                (step(11, 3), sent[2]),  # re-sent (with other contents): answered as first computed
                (step(9, 1), sent[3]),  # an older id, never computed: refused, it would sign a second record
            ],
            session_id=session,
            with_tensors=True,
        )
    )
    assert [r.header.get("code", r.header["type"]) for r in replies] == ["output", "output", "output", "stale_step"]
    for reply, tensor in zip(replies[:2], sent, strict=False):
        record = StepRecord.from_dict(reply.header["record"]).verify()
        record.check_about(
            peer=first_agent.peer_id,
            session_id=session,
            step_id=reply.header["step_id"],
            position=reply.header["position"],
            output_digest=digest_hex(reply.tensors[0]),
        )
        assert record.input_digest == digest_hex(tensor) and "input_record" not in reply.header
    assert replies[2].header["record"] == replies[1].header["record"]
    assert_still_serves(runtime2, first_agent.peer_id)


def test_a_session_reopened_under_its_old_id_signs_records_that_prove_nothing(runtime2, first_agent):
    # A client replaying step ids in a reopened session must not get two records of "one step".
    step = {"type": "step", "session_id": "reopened-session", "step_id": 1, "position": 0}

    def run_once(offset: float) -> dict | None:
        try:
            return runtime2.run(
                _session_steps(
                    runtime2, first_agent.peer_id, [(step, hidden(3) + offset)], session_id="reopened-session"
                )
            )[0]
        except RemoteError as e:  # the agent has not yet seen the first stream close
            if e.code != "session_exists":
                raise
            return None

    first = run_once(0.0)
    second = wait_for("the session id to be free again", lambda: run_once(1.0))
    a, b = StepRecord.from_dict(first["record"]).verify(), StepRecord.from_dict(second["record"]).verify()
    assert (a.session_id, a.step_id) == (b.session_id, b.step_id) and a.output_digest != b.output_digest
    assert a.instance != b.instance and not equivocation(a, b)


def test_push_for_an_unknown_session_is_refused(runtime2, first_agent):
    header = Step(session_id="no-such-session", step_id=0, position=0).to_header()
    (reply,) = runtime2.run(raw_exchange(runtime2, first_agent.peer_id, RPC_PUSH, [_frames(header, (hidden(),))]))
    assert reply["code"] == "unknown_session"
    assert_still_serves(runtime2, first_agent.peer_id)


def test_info_rejects_tensors(runtime2, first_agent):
    (reply,) = runtime2.run(raw_exchange(runtime2, first_agent.peer_id, RPC_INFO, [_frames({}, (hidden(),))]))
    assert reply["code"] == "bad_request"


def test_a_burst_of_concurrent_requests_is_answered_in_full(runtime2, first_agent):
    """More streams at once than an accept queue of 100 holds: each gets its reply. (The
    handler socket listened with asyncio's default backlog of 100; the p2p daemon reset the
    streams it could not hand over, and their clients saw closed streams.)"""
    connection = ProviderConnection(runtime2.p2p, first_agent.peer_id)

    async def burst() -> list[str]:
        async def one() -> str:
            try:
                output = await connection.forward(0, 2, hidden(2), timeout=120)
                return "ok" if output.shape == (1, 2, HIDDEN) else "wrong shape"
            except Exception as e:  # noqa: BLE001 - counted, reported below
                return f"{type(e).__name__}: {e}"

        return await asyncio.gather(*[one() for _ in range(120)])

    failures = [r for _ in range(5) for r in runtime2.run(burst()) if r != "ok"]
    assert failures == [], f"{len(failures)} of 600 failed, e.g. {failures[:2]}"


def test_bad_padding_masks_and_beam_reorders_are_refused_and_the_session_goes_on(runtime2, first_agent):
    def step(step_id: int, position: int, **extra) -> dict:
        return {"type": "step", "session_id": "mask-session-1", "step_id": step_id, "position": position, **extra}

    replies = runtime2.run(
        _session_steps(
            runtime2,
            first_agent.peer_id,
            [
                (step(0, 0, mask=[[0, 1, 1]]), hidden(3)),  # fine: the first token is padding
                (step(1, 3, mask=[[1, 1]]), hidden(1)),  # a mask of 2 tokens for 1
                (step(2, 3, mask=[[2]]), hidden(1)),  # not 0/1
                (step(3, 3, mask=[[1], [1, 1]]), hidden(1)),  # ragged
                (step(4, 3, mask="1"), hidden(1)),  # not a list of rows
                (step(5, 3, reorder=[1]), hidden(1)),  # row 1 of a batch of 1
                (step(6, 3, reorder=[0, 0]), hidden(1)),  # two rows for one
                (step(7, 3, reorder=[-1]), hidden(1)),  # negative
                (step(8, 3, reorder=[0], mask=[[1]]), hidden(1)),  # fine
            ],
            session_id="mask-session-1",
        )
    )
    codes = [r.get("code", r["type"]) for r in replies]
    assert codes == [
        "output",
        "bad_shape",
        "bad_request",
        "bad_request",
        "bad_request",
        "bad_request",
        "bad_request",
        "bad_request",
        "output",
    ]
    assert_still_serves(runtime2, first_agent.peer_id)
