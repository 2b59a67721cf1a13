"""The fast local baseline of ``hivemart bench inference`` generates what ``transformers`` does."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from hivemart.bench.inference import FastLocalGenerator


def test_fast_local_generation_matches_transformers(tiny_model):
    prompt = torch.tensor([[5, 17, 99, 3, 42], [7, 7, 8, 1, 2]])
    fast = FastLocalGenerator(tiny_model, dtype=torch.float32, device="cpu").generate(prompt, 9)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert fast.shape == (2, 14) and torch.equal(fast, expected)
