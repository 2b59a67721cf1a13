"""PEFT LoRA adapters at inference: ``generate(adapter=...)``, ``inference_session(adapter=...)``
and ``hivemart generate --adapter`` give what ``peft`` gives locally; sessions with an adapter
and without one run side by side exactly; bad adapters fail with clear, typed errors."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from client_sdk.finetune.peft_export import AdapterFormatError
from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart.cli import cli
from hivemart_core.errors import RemoteError
from hivemart_core.models import load_tokenizer
from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.rpc import RPC_ADAPTER, AdapterRequest, OpenSession
from hivemart_core.swarm.connection import ProviderConnection, Reply
from hivemart_core.swarm.runtime import SwarmRuntime

pytestmark = pytest.mark.swarm

NEW_TOKENS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA of the tiny model, saved by ``peft`` itself, with random non-zero B."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: an adapter that changes nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def local_peft(tiny_model: Path, peft_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(peft_dir)).eval()


@pytest.fixture(scope="module")
def model(tiny_model: Path, runtime2: SwarmRuntime) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime2)


def _ids(tiny_model: Path, text: str = "An adapter changes what the swarm says") -> torch.Tensor:
    return load_tokenizer(tiny_model)(text, return_tensors="pt").input_ids


def _greedy(local: torch.nn.Module, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = local.generate(
            input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        return out


def test_greedy_generation_with_a_peft_lora_gives_local_pefts_tokens_and_logits(
    tiny_model: Path, peft_dir: Path, local_peft: torch.nn.Module, model: DistributedModelForCausalLM
) -> None:
    ids = _ids(tiny_model)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    remote = model.generate(ids, adapter=peft_dir, **kwargs)
    with torch.inference_mode():
        local = local_peft.generate(input_ids=ids, **kwargs)
    assert torch.equal(remote.sequences, local.sequences)
    for mine, theirs in zip(remote.logits, local.logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    # The adapter matters: the base model says something else.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    assert not torch.equal(_greedy(base, ids), local.sequences)

    # A kept session with a loaded adapter continues as local PEFT does.
    adapter = model.load_adapter(peft_dir)
    try:
        with model.inference_session(max_length=ids.shape[1] + 2 * NEW_TOKENS, adapter=adapter) as session:
            first = model.generate(ids, max_new_tokens=4, session=session)
            rest = model.generate(None, max_new_tokens=NEW_TOKENS - 4, session=session)
        assert torch.equal(torch.cat([first, rest], dim=1), local.sequences)
        # The same loaded adapter, once more: its copies on the providers are reused.
        placed = adapter.placements()
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, adapter=adapter), local.sequences)
        assert adapter.placements() == placed
    finally:
        model.release_adapter(adapter)


def test_a_provider_that_forgot_the_adapter_gets_it_again(
    tiny_model: Path, peft_dir: Path, local_peft: torch.nn.Module, model: DistributedModelForCausalLM
) -> None:
    ids = _ids(tiny_model, "Forgotten adapters come back")
    adapter = model.load_adapter(peft_dir)
    try:
        model.generate(ids, max_new_tokens=1, adapter=adapter)
        runtime = model.runtime
        for (peer_id, _, _), adapter_id in adapter.placements().items():  # as if they expired there
            request = AdapterRequest("delete", adapter_id).to_header()
            runtime.run(ProviderConnection(runtime.p2p, peer_id).call(RPC_ADAPTER, request, (), 10.0))
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, adapter=adapter), _greedy(local_peft, ids))
    finally:
        model.release_adapter(adapter)


def test_rebuilt_hops_get_the_adapter_uploaded_and_replay_under_it(
    tiny_model: Path, peft_dir: Path, local_peft: torch.nn.Module, model: DistributedModelForCausalLM
) -> None:
    """What failover does for a replacement provider: upload the adapter, then replay."""
    ids = _ids(tiny_model, "Replacements apply the adapter too")
    adapter = model.load_adapter(peft_dir)
    runtime = model.runtime
    try:
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS, adapter=adapter) as session:
            first = model.generate(ids, max_new_tokens=4, session=session)
            placed = adapter.placements()
            for (peer_id, _, _), adapter_id in placed.items():  # the providers lose it (a restart)...
                request = AdapterRequest("delete", adapter_id).to_header()
                runtime.run(ProviderConnection(runtime.p2p, peer_id).call(RPC_ADAPTER, request, (), 10.0))
            chain = session.chain
            old = [hop.stream.spec.session_id for hop in chain.hops]
            # ...and every hop is rebuilt on new sessions, replaying the history.
            runtime.run(chain._replace_from(0, chain._next_step_id, reason="test", exclude=None))  # noqa: SLF001
            assert not set(old) & {hop.stream.spec.session_id for hop in chain.hops}
            assert not set(placed.values()) & set(adapter.placements().values())  # uploaded again
            rest = model.generate(None, max_new_tokens=NEW_TOKENS - 4, session=session)
        assert torch.equal(torch.cat([first, rest], dim=1), _greedy(local_peft, ids))
    finally:
        model.release_adapter(adapter)


def test_sessions_with_and_without_an_adapter_side_by_side_are_exact(
    tiny_model: Path, peft_dir: Path, local_peft: torch.nn.Module, model: DistributedModelForCausalLM
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = _ids(tiny_model, "Sessions with and without adapters share providers")
    prompts = [ids[:, : ids.shape[1] - i] for i in range(4)]
    adapter = model.load_adapter(peft_dir)
    plan = [(prompt, adapter if i % 2 == 0 else None) for i, prompt in enumerate(prompts)]
    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            outputs = list(
                pool.map(lambda job: model.generate(job[0], max_new_tokens=NEW_TOKENS, adapter=job[1]), plan)
            )
    finally:
        model.release_adapter(adapter)
    for (prompt, lora), output in zip(plan, outputs, strict=True):
        assert torch.equal(output, _greedy(local_peft if lora is not None else base, prompt))


def test_bad_adapter_directories_are_refused_with_clear_errors(
    tiny_model: Path, peft_dir: Path, tmp_path: Path, model: DistributedModelForCausalLM
) -> None:
    ids = _ids(tiny_model)
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        model.generate(ids, max_new_tokens=2, adapter=tmp_path)
    # A LoRA of another model: its matrices do not fit this model's layers.
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    state = {
        k: torch.cat([v, v], dim=1) if "lora_A" in k else v
        for k, v in load_file(peft_dir / "adapter_model.safetensors").items()
    }
    save_file(state, str(other / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="another model"):
        model.load_adapter(other)
    # What providers cannot compute as PEFT does is refused, not approximated.
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        model.load_adapter(other)
    with pytest.raises(ValueError, match="inference_session"):
        with model.inference_session(max_length=16) as session:
            model.generate(ids, max_new_tokens=2, session=session, adapter=peft_dir)


def test_a_session_naming_an_unknown_adapter_is_refused_with_a_typed_error(
    two_provider_swarm: LocalSwarm, runtime2: SwarmRuntime
) -> None:
    agent = two_provider_swarm.agents[0]
    spec = OpenSession(session_id="adapterless-1", start=0, end=2, max_length=8, adapter_id="never-created-1")
    inbox: asyncio.Queue[Reply] = asyncio.Queue()
    with pytest.raises(RemoteError) as refused:
        runtime2.run(ProviderConnection(runtime2.p2p, agent.peer_id).open_inference(spec, inbox))
    assert refused.value.code == codes.UNKNOWN_ADAPTER
    # An adapter of ours that does not cover the session's blocks.
    connection = ProviderConnection(runtime2.p2p, agent.peer_id)
    create = AdapterRequest("create", "one-block-1", 0, 1, 2, 4.0, ("q_proj",), seed=0)
    runtime2.run(connection.call(RPC_ADAPTER, create.to_header(), (), 10.0))
    try:
        narrow = OpenSession(session_id="adapterless-2", start=0, end=2, max_length=8, adapter_id="one-block-1")
        with pytest.raises(RemoteError) as refused:
            runtime2.run(connection.open_inference(narrow, inbox))
        assert refused.value.code == codes.BAD_SPAN and "covers blocks 0:1" in str(refused.value)
    finally:
        runtime2.run(connection.call(RPC_ADAPTER, AdapterRequest("delete", "one-block-1").to_header(), (), 10.0))


def test_generate_cli_applies_the_adapter(
    tiny_model: Path, peft_dir: Path, local_peft: torch.nn.Module, two_provider_swarm: LocalSwarm, tmp_path: Path
) -> None:
    prompt = "The swarm answers"
    peers = [a for peer in two_provider_swarm.initial_peers for a in ("--initial-peers", peer)]
    base = ["generate", prompt, "--model", str(tiny_model), *peers, "--max-new-tokens", "6", "--json"]
    result = CliRunner().invoke(cli, [*base, "--adapter", str(peft_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert out["text"] == tokenizer.decode(_greedy(local_peft, ids, 6)[0, ids.shape[1] :])

    refused = CliRunner().invoke(cli, [*base, "--adapter", str(tmp_path)])
    assert refused.exit_code != 0 and "no adapter_config.json" in refused.output
