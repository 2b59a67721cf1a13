"""Reading PEFT LoRA directories for inference (``read_peft_adapter``): our own export reads
back unchanged, and adapters PEFT saved with options that change scaling (rsLoRA) or leave
blocks out (``layers_to_transform``) compute on the blocks exactly what ``peft`` computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.finetune.peft_export import AdapterFormatError, read_peft_adapter, save_peft_adapter
from hivemart_core.models import load_client_parts, load_config
from hivemart_core.models.backend import LoraWeights, SpanBackend
from hivemart_core.models.lora import LoraSpec, init_weights, split_block, target_shapes


def test_our_export_reads_back_unchanged(tiny_model: Path, tmp_path: Path) -> None:
    shapes = target_shapes(load_config(tiny_model))
    spec = LoraSpec(rank=3, alpha=6.0, targets=("v_proj", "q_proj", "down_proj"))  # any order
    weights = init_weights(spec, shapes, 1, 0, 4) + 0.01 * torch.randn(4, init_weights(spec, shapes, 1, 0, 1).shape[1])
    save_peft_adapter(spec, shapes, weights, tmp_path / "adapter", base_model=tiny_model)
    read_spec, read = read_peft_adapter(tmp_path / "adapter", shapes, 4)
    # Targets come back in the model's order; each target's matrices are the same.
    assert read_spec.targets == ("q_proj", "v_proj", "down_proj")
    assert (read_spec.rank, read_spec.scaling) == (spec.rank, spec.scaling)
    for block in range(4):
        ours, theirs = split_block(spec, shapes, weights[block]), split_block(read_spec, shapes, read[block])
        for target in spec.targets:
            assert all(torch.equal(a, b) for a, b in zip(ours[target], theirs[target], strict=True))


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"layers_to_transform": [1, 3]}])
def test_peft_options_compute_what_peft_computes(tiny_model: Path, tmp_path: Path, options: dict[str, object]) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], lora_dropout=0.0, **options)
    peft_model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(tmp_path))

    spec, weights = read_peft_adapter(tmp_path, target_shapes(load_config(tiny_model)), 4)
    parts, backend = load_client_parts(tiny_model), SpanBackend(tiny_model, 0, 4)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        hidden = backend.forward(parts.embed(ids), 0, 4, lora=LoraWeights(spec, weights, 0))
        torch.testing.assert_close(parts.logits(hidden), peft_model(ids).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(parts.logits(backend.forward(parts.embed(ids), 0, 4)), peft_model(ids).logits)


def test_lora_outside_the_blocks_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"])).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFormatError, match="lm_head"):
        read_peft_adapter(tmp_path, target_shapes(load_config(tiny_model)), 4)
