"""Replies are parsed as strictly as requests: a malformed reply is a ProtocolError naming the
field (never a KeyError or ValueError in the client), and a reply on an inference stream that
is malformed fails that stream like a broken one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.framing import encode_message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.rpc import (
    PROTOCOL_VERSION,
    AdapterReply,
    ErrorReply,
    GradReply,
    InfoReply,
    OpenedReply,
    OpenSession,
    OutputReply,
    ReceiptReply,
    RelinkedReply,
    StepOutputReply,
    parse_stream_reply,
)
from hivemart_core.swarm.connection import InferenceStream, StreamMessage

PEER = Identity.generate().peer_id
SESSION = "session-0001"


def info(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "type": "info",
        "protocol_version": PROTOCOL_VERSION,
        "peer_id": PEER,
        "model_id": "tiny-model",
        "start": 0,
        "end": 4,
        "dtype": "float32",
        "hidden_size": 64,
        "block_digests": ["ab" * 32] * 4,
        "accepting": True,
        "sessions": 0,
        "max_sessions": 8,
        "cache_bytes_left": 1 << 20,
        "cache_tokens_left": 100,
        "max_session_length": 512,
        "max_batch_size": 4,
        "max_request_tokens": 2048,
        "adapter_bytes_left": 1 << 20,
        "max_adapter_rank": 64,
        "graphs_kept": 0,
        "graph_bytes_used": 0,
        "graph_bytes": 1 << 20,
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not ...}


def step_output(**changes: Any) -> dict[str, Any]:
    header = {"type": "output", "step_id": 3, "position": 5, "record": {"peer": PEER}, **changes}
    return {k: v for k, v in header.items() if v is not ...}


def test_well_formed_replies_parse() -> None:
    parsed = InfoReply.from_header(info())
    assert (parsed.start, parsed.end, parsed.protocol_version) == (0, 4, PROTOCOL_VERSION)
    assert InfoReply.from_header(parsed.to_header()) == parsed
    assert StepOutputReply.from_header(step_output()).step_id == 3
    assert OutputReply.from_header({"type": "output", "kept": True}).kept is True
    assert GradReply.from_header({"type": "grad", "prompts": False, "lora_grads": True}).lora_grads
    assert (
        AdapterReply.from_header({"type": "adapter", "op": "create", "adapter_id": "adapter-1", "numel": 8}).numel == 8
    )
    assert (
        OpenedReply.from_header({"type": "opened", "session_id": SESSION, "cache_tokens_left": 9}).cache_tokens_left
        == 9
    )
    error = ErrorReply.from_header({"type": "error", "code": "busy", "message": "later", "step_id": 2, "peer_id": PEER})
    assert error.extra == {"step_id": 2, "peer_id": PEER}


@pytest.mark.parametrize(
    ("parse", "header", "field"),
    [
        (InfoReply.from_header, info(start=...), "'start'"),
        (InfoReply.from_header, info(hidden_size="64"), "'hidden_size'"),
        (InfoReply.from_header, info(sessions=True), "'sessions'"),  # a bool is not an int
        (InfoReply.from_header, info(cache_tokens_left=-1), "'cache_tokens_left'"),
        (InfoReply.from_header, info(accepting=1), "'accepting'"),
        (InfoReply.from_header, info(dtype="int8"), "'dtype'"),
        (InfoReply.from_header, info(block_digests="ab"), "'block_digests'"),
        (InfoReply.from_header, info(peer_id="not a peer"), "'peer_id'"),
        (InfoReply.from_header, info(type="output"), "'type'"),
        (StepOutputReply.from_header, step_output(step_id=...), "'step_id'"),
        (StepOutputReply.from_header, step_output(step_id=True), "'step_id'"),
        (StepOutputReply.from_header, step_output(step_id="7"), "'step_id'"),
        (StepOutputReply.from_header, step_output(position=-1), "'position'"),
        (StepOutputReply.from_header, step_output(record=...), "'record'"),
        (StepOutputReply.from_header, step_output(input_record=[1]), "'input_record'"),
        (OutputReply.from_header, {"type": "output", "kept": 1}, "'kept'"),
        (OutputReply.from_header, {"type": "output", "receipt": "signed"}, "'receipt'"),
        (GradReply.from_header, {"type": "grad", "prompts": "yes"}, "'prompts'"),
        (AdapterReply.from_header, {"type": "adapter", "op": "steal", "adapter_id": "adapter-1"}, "'op'"),
        (AdapterReply.from_header, {"type": "adapter", "op": "get"}, "'adapter_id'"),
        (OpenedReply.from_header, {"type": "opened", "session_id": SESSION}, "'cache_tokens_left'"),
        (OpenedReply.from_header, {"type": "opened", "session_id": 5, "cache_tokens_left": 1}, "'session_id'"),
        (RelinkedReply.from_header, {"type": "relinked"}, "'session_id'"),
        (ReceiptReply.from_header, {"type": "receipt"}, "'receipt'"),
        (ErrorReply.from_header, {"type": "error", "message": "no"}, "'code'"),
        (ErrorReply.from_header, {"type": "error", "code": "busy", "message": 3}, "'message'"),
        (ErrorReply.from_header, {"type": "error", "code": "busy", "message": "", "step_id": -1}, "'step_id'"),
        (ErrorReply.from_header, {"type": "error", "code": "busy", "message": "", "peer_id": 5}, "'peer_id'"),
        (parse_stream_reply, {"type": "opened", "session_id": SESSION}, "'type'"),
        (parse_stream_reply, {"step_id": 1}, "'type'"),
        (parse_stream_reply, ["output"], "'type'"),
    ],
)
def test_a_malformed_reply_is_a_protocol_error_naming_the_field(parse: Any, header: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse(header)
    assert field in str(raised.value)


@pytest.mark.parametrize("version", [1, PROTOCOL_VERSION + 1, ...])
def test_an_info_reply_of_another_version_says_which_side_to_upgrade(version: Any) -> None:
    with pytest.raises(ProtocolError) as raised:
        InfoReply.from_header(info(protocol_version=version))  # ...: absent, a version 1 provider
    theirs = 1 if version is ... else version
    assert raised.value.code == "unsupported_version"
    assert f"provider speaks protocol v{theirs}, this client v{PROTOCOL_VERSION}; upgrade" in str(raised.value)


def test_a_malformed_reply_on_an_inference_stream_fails_that_stream() -> None:
    """The stream's reader hands the chain the ProtocolError (the session fails the hop over,
    as for a broken stream) and reads nothing after it."""

    async def run() -> list[Any]:
        reader, inbox = asyncio.StreamReader(), asyncio.Queue[Any]()
        hidden = torch.zeros(1, 1, 4)
        for header in (step_output(), step_output(step_id=True), step_output(step_id=4)):
            for frame in encode_message(header, (hidden,)):
                reader.feed_data(frame)
        writer: Any = None  # never written to here
        spec = OpenSession(session_id=SESSION, start=0, end=4, max_length=8)
        stream = InferenceStream(PEER, spec, reader, writer, inbox)
        got = [await inbox.get(), await inbox.get()]
        await asyncio.sleep(0)
        assert inbox.empty() and stream.finished
        return got

    first, second = asyncio.run(run())
    assert isinstance(first[1], StreamMessage) and isinstance(first[1].reply, StepOutputReply)
    assert isinstance(second[1], ProtocolError) and "'step_id'" in str(second[1])
