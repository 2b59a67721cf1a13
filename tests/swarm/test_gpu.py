"""Exactness on CUDA in half precision (runs only where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import create_model, load_tokenizer
from hivemart_core.swarm.runtime import SwarmRuntime

pytestmark = [pytest.mark.swarm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_greedy_generation_on_cuda_matches_local(tmp_path: Path, dtype: str):
    model_path = create_model(tmp_path / "model", arch="llama", hidden=256, layers=4, seed=0)
    prompt = load_tokenizer(model_path)("Half precision on a GPU", return_tensors="pt").input_ids
    torch_dtype = getattr(torch, dtype)
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).cuda().eval()
    with torch.inference_mode():
        expected = local.generate(
            prompt.cuda(), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        ).cpu()
        expected_logits = local(expected.cuda()).logits.float().cpu()
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        swarm.start_agents(model_path, [(0, 2), (2, 4)], extra_args=["--device", "cuda", "--dtype", dtype])
        with SwarmRuntime(swarm.initial_peers) as runtime:
            model = DistributedModelForCausalLM.from_pretrained(
                model_path, runtime=runtime, dtype=torch_dtype, device="cuda"
            )
            tokens = model.generate(prompt, max_new_tokens=32)
            with torch.no_grad():
                logits = model(expected).float().cpu()
    assert torch.equal(tokens, expected)
    # Half-precision logits of a whole sequence: forward differs from step-by-step by rounding only.
    torch.testing.assert_close(logits, expected_logits, atol=0.05 if dtype == "float16" else 0.25, rtol=0.02)
