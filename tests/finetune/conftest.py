"""Fixtures for fine-tuning tests: a tiny model, a swarm of real agents, local references."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.finetune.peft_export import peft_state_dict
from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from client_sdk.swarm.remote import RemoteLora
from hivemart_core.models import load_config
from hivemart_core.models.lora import LoraSpec, module_path, target_shapes
from hivemart_core.swarm.runtime import SwarmRuntime


# The session's shared swarm (tests/conftest.py), also used by the swarm tests: starting agents is
# most of these tests' time.
@pytest.fixture(scope="session")
def swarm(two_provider_swarm: LocalSwarm) -> LocalSwarm:
    return two_provider_swarm


@pytest.fixture(scope="session")
def runtime(swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(swarm.initial_peers) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def model(tiny_model: Path, runtime: SwarmRuntime) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime)


@pytest.fixture(scope="session")
def local_model(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def make_lora(
    tiny_model: Path,
    *,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    random_b: bool = False,
) -> RemoteLora:
    """A client-side adapter; ``random_b`` fills B too (PEFT starts it at zero) so that every
    weight gets a gradient and the adapter changes outputs."""
    config = load_config(tiny_model)
    spec = LoraSpec(rank, 2.0 * rank, targets)
    lora = RemoteLora(spec, target_shapes(config), config.num_hidden_layers, seed=seed)
    if random_b:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            lora.weights.copy_(torch.randn(lora.weights.shape, generator=generator) * 0.2)
    return lora


def local_peft(tiny_model: Path, lora: RemoteLora):
    """Local transformers + PEFT with the same adapter weights, in training mode for grads."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=lora.spec.rank, lora_alpha=lora.spec.alpha, target_modules=list(lora.spec.targets), lora_dropout=0.0
        ),
    )
    set_peft_model_state_dict(peft_model, peft_state_dict(lora.spec, lora.shapes, lora.weights))
    return peft_model.eval()


def peft_grads(peft_model, lora: RemoteLora) -> torch.Tensor:
    """The PEFT model's LoRA gradients in the flat ``[num_blocks, per_block]`` layout."""
    modules = dict(peft_model.named_modules())
    rows = []
    for block in range(lora.num_blocks):
        parts = []
        for target in lora.spec.targets:
            layer = modules[f"base_model.model.model.layers.{block}.{module_path(target)}"]
            parts += [layer.lora_A["default"].weight.grad.flatten(), layer.lora_B["default"].weight.grad.flatten()]
        rows.append(torch.cat(parts))
    return torch.stack(rows)
