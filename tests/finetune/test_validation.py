"""Bad fine-tuning requests get clear errors and the provider keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client_sdk.swarm.local import LocalSwarm
from hivemart_core.errors import ProtocolError, RemoteError
from hivemart_core.models.adapters import AdapterError, AdapterStore
from hivemart_core.models.lora import LoraSpec
from hivemart_core.protocol.rpc import RPC_ADAPTER, RPC_BACKWARD, RPC_FORWARD, AdapterRequest, SpanRequest, SpanTuning
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime
from tests.swarm.conftest import start_swarm

pytestmark = pytest.mark.swarm

HIDDEN = 64
# q_proj and v_proj of the tiny model at rank 4: 4 * (64 + 64) + 4 * (64 + 32) = 896 values per block.
PER_BLOCK = 896


@pytest.fixture(scope="module")
def agent_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    # 20 KB of adapters: one 4-block rank-4 q/v adapter (14 KB) fits, a second does not.
    swarm = start_swarm(
        tiny_model,
        [(0, 4)],
        tmp_path_factory.mktemp("validation"),
        extra_args=["--adapter-mb", str(20_000 / 2**20), "--max-adapter-rank", "16"],
    )
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def runtime(agent_swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(agent_swarm.initial_peers) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def connection(agent_swarm: LocalSwarm, runtime: SwarmRuntime) -> ProviderConnection:
    return ProviderConnection(runtime.p2p, agent_swarm.agents[0].peer_id)


def call(runtime: SwarmRuntime, connection: ProviderConnection, rpc: str, header: dict, tensors=()):
    return runtime.run(connection.call(rpc, header, tensors, timeout=30))


def create(adapter_id: str, *, rank: int = 4, seed: int | None = 0, start: int = 0, end: int = 4) -> dict:
    return AdapterRequest("create", adapter_id, start, end, rank, 8.0, ("q_proj", "v_proj"), seed).to_header()


def hidden(batch: int = 1, tokens: int = 6) -> torch.Tensor:
    return torch.randn(batch, tokens, HIDDEN)


def assert_still_serves(runtime: SwarmRuntime, connection: ProviderConnection) -> None:
    reply = call(runtime, connection, RPC_FORWARD, SpanRequest(0, 4).to_header(), (hidden(),))
    assert reply.tensors[0].shape == (1, 6, HIDDEN)


@pytest.mark.parametrize(
    "shape, reason",
    [
        ((3, 1, 2, HIDDEN), "blocks"),
        ((4, 2, 2, HIDDEN), "batch"),
        ((4, 1, 7, HIDDEN), "prefix longer than tokens"),
        ((4, 1, 2, 32), "hidden"),
        ((4, 2, HIDDEN), "rank"),
    ],
)
def test_wrong_prompt_shape_is_refused(runtime, connection, shape, reason):
    header = SpanRequest(0, 4, tuning=SpanTuning(prompts=True)).to_header()
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_FORWARD, header, (hidden(), torch.zeros(shape)))
    assert error.value.code == "bad_shape" and "deep prompts" in str(error.value), reason
    assert_still_serves(runtime, connection)


def test_prompts_flag_without_the_tensor_and_nan_prompts_are_refused(runtime, connection):
    header = SpanRequest(0, 4, tuning=SpanTuning(prompts=True)).to_header()
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_FORWARD, header, (hidden(),))
    assert error.value.code == "bad_request" and "deep prompts" in str(error.value)
    bad = torch.zeros(4, 1, 2, HIDDEN)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_BACKWARD, header, (hidden(), hidden(), bad))
    assert error.value.code == "bad_value"
    assert_still_serves(runtime, connection)


def test_unknown_adapter_and_lora_grads_without_adapter(runtime, connection):
    header = SpanRequest(0, 4, tuning=SpanTuning(adapter_id="no-such-adapter")).to_header()
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_FORWARD, header, (hidden(),))
    assert error.value.code == "unknown_adapter" and "create it again" in str(error.value)
    with pytest.raises(RemoteError) as error:
        call(
            runtime,
            connection,
            RPC_BACKWARD,
            {**SpanRequest(0, 4).to_header(), "lora_grads": True},
            (hidden(), hidden()),
        )
    assert error.value.code == "bad_request" and "adapter_id" in str(error.value)
    assert_still_serves(runtime, connection)


def test_rank_over_the_limit_and_bad_targets_are_refused(runtime, connection):
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_ADAPTER, create("too-large-rank", rank=32))
    assert error.value.code == "too_large" and "rank 32" in str(error.value)
    header = {**create("bad-targets-1"), "targets": ["nonsense"]}
    with pytest.raises(RemoteError) as error:
        call(runtime, connection, RPC_ADAPTER, header)
    assert error.value.code == "bad_request" and "unknown target" in str(error.value)
    with pytest.raises(RemoteError) as error:  # weights of the wrong shape
        call(runtime, connection, RPC_ADAPTER, create("bad-weights", seed=None), (torch.zeros(4, 10),))
    assert error.value.code == "bad_shape" and str(PER_BLOCK) in str(error.value)
    assert_still_serves(runtime, connection)


def test_memory_budget_exhausted_then_freed_by_delete(runtime, connection):
    call(runtime, connection, RPC_ADAPTER, create("first-adapter"))
    try:
        with pytest.raises(RemoteError) as error:
            call(runtime, connection, RPC_ADAPTER, create("second-adapter"))
        assert error.value.code == "adapter_memory_full" and "free" in str(error.value)
        assert_still_serves(runtime, connection)
        info = runtime.run(connection.info())
        assert info["adapter_bytes_left"] < 4 * PER_BLOCK * 4
    finally:
        call(runtime, connection, RPC_ADAPTER, AdapterRequest("delete", "first-adapter").to_header())
    call(runtime, connection, RPC_ADAPTER, create("second-adapter"))  # room again
    call(runtime, connection, RPC_ADAPTER, AdapterRequest("delete", "second-adapter").to_header())


def test_an_adapter_is_usable_only_by_the_peer_that_created_it(agent_swarm, runtime, connection):
    call(runtime, connection, RPC_ADAPTER, create("owned-adapter"))
    try:
        with SwarmRuntime(agent_swarm.initial_peers) as other:
            stranger = ProviderConnection(other.p2p, connection.peer_id)
            header = SpanRequest(0, 4, tuning=SpanTuning(adapter_id="owned-adapter")).to_header()
            with pytest.raises(RemoteError) as error:
                call(other, stranger, RPC_FORWARD, header, (hidden(),))
            assert error.value.code == "unknown_adapter"
            with pytest.raises(RemoteError):
                call(other, stranger, RPC_ADAPTER, AdapterRequest("delete", "owned-adapter").to_header())
        weights = call(runtime, connection, RPC_ADAPTER, AdapterRequest("get", "owned-adapter").to_header()).tensors[0]
        assert weights.shape == (4, PER_BLOCK)
    finally:
        call(runtime, connection, RPC_ADAPTER, AdapterRequest("delete", "owned-adapter").to_header())


@pytest.mark.parametrize(
    "header, message",
    [
        ({"type": "adapter", "op": "explode", "adapter_id": "abcdefgh"}, "'op'"),
        ({"type": "adapter", "op": "get", "adapter_id": "x"}, "adapter_id"),
        (
            {
                "type": "adapter",
                "op": "create",
                "adapter_id": "abcdefgh",
                "start": 0,
                "end": 4,
                "rank": 4,
                "alpha": float("nan"),
                "targets": ["q_proj"],
            },
            "alpha",
        ),
    ],
)
def test_malformed_adapter_headers_are_protocol_errors(header, message):
    with pytest.raises(ProtocolError, match=message):
        AdapterRequest.from_header(header)


def test_store_expires_unused_adapters():
    store = AdapterStore(budget_bytes=10_000, max_rank=8, ttl=5.0)
    from hivemart_core.models.adapters import Adapter

    store.add(Adapter("old-adapter", "peer", 0, 1, LoraSpec(1, 1.0, ("q_proj",)), torch.zeros(1, 8), last_used=0.0))
    store.add(Adapter("new-adapter", "peer", 0, 1, LoraSpec(1, 1.0, ("q_proj",)), torch.zeros(1, 8), last_used=8.0))
    assert store.expire(now=10.0) == ["old-adapter"]
    with pytest.raises(AdapterError) as error:
        store.get("old-adapter", "peer")
    assert error.value.code == "unknown_adapter"
    assert store.get("new-adapter", "peer").adapter_id == "new-adapter"


def test_a_kept_graph_serves_its_backward_and_a_mismatched_backward_recomputes(runtime, connection):
    inputs, grad = hidden(2, 5), hidden(2, 5)
    plain = call(runtime, connection, RPC_BACKWARD, SpanRequest(0, 4).to_header(), (inputs, grad))
    kept_header = SpanRequest(0, 4, tuning=SpanTuning(graph_id="graph-one")).to_header()
    forward = call(runtime, connection, RPC_FORWARD, kept_header, (inputs,))
    assert forward.header["kept"] is True
    expected = call(runtime, connection, RPC_FORWARD, SpanRequest(0, 4).to_header(), (inputs,))
    torch.testing.assert_close(forward.tensors[0], expected.tensors[0], atol=0, rtol=0)

    backward = call(runtime, connection, RPC_BACKWARD, kept_header, (inputs, grad))
    assert backward.header["recomputed"] is False
    torch.testing.assert_close(backward.tensors[0], plain.tensors[0], atol=1e-6, rtol=1e-5)
    again = call(runtime, connection, RPC_BACKWARD, kept_header, (inputs, grad))  # a graph serves once
    assert again.header["recomputed"] is True

    call(runtime, connection, RPC_FORWARD, kept_header, (inputs,))
    other = hidden(2, 5)
    mismatched = call(runtime, connection, RPC_BACKWARD, kept_header, (other, grad))
    assert mismatched.header["recomputed"] is True
    reference = call(runtime, connection, RPC_BACKWARD, SpanRequest(0, 4).to_header(), (other, grad))
    torch.testing.assert_close(mismatched.tensors[0], reference.tensors[0], atol=0, rtol=0)


def test_kept_graphs_stay_within_their_budget_and_expire():
    from hivemart_core.models.backend import KeptGraph, KeptGraphs

    def graph(nbytes: int) -> KeptGraph:
        return KeptGraph(0, 1, torch.zeros(1), None, None, False, torch.zeros(1), nbytes)

    graphs = KeptGraphs(budget_bytes=100, ttl=5.0)
    assert graphs.put("peer", "a", graph(60)) and graphs.put("peer", "b", graph(30))
    assert graphs.put("peer", "c", graph(50))  # drops the oldest ("a") to make room
    assert graphs.pop("peer", "a") is None and graphs.used_bytes == 80
    assert not graphs.put("peer", "huge", graph(101))
    assert graphs.pop("other-peer", "b") is None  # keyed by owner too
    assert graphs.expire(now=time.monotonic() + 6) == 2 and len(graphs) == 0 and graphs.used_bytes == 0
