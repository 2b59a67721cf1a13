"""The parity matrix: ``DistributedModelForCausalLM.generate`` is transformers' ``generate``, and
gives what the same checkpoint gives locally, feature by feature.

Greedy and beam search must give exactly the local tokens. Seeded sampling too: both draw from
torch's global generator in the same order, and the logits agree to float rounding, far below
what would change a draw on this model. Scores agree within 1e-4 (the providers' matrix products
may sum in another order than the local model's)."""

from __future__ import annotations

from pathlib import Path
from threading import Thread
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.errors import HivemartError
from hivemart_core.models import load_tokenizer
from hivemart_core.swarm.runtime import SwarmRuntime

pytestmark = pytest.mark.swarm

TEXTS = ["Hello there my friend, the swarm", "Hi", "Blocks of a model"]


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tiny_model: Path, runtime2: SwarmRuntime) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime2)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def batch(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    encoded = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    encoded.pop("token_type_ids", None)  # a Llama's forward takes none (locally too)
    assert int((encoded["attention_mask"] == 0).sum()) > 0  # the rows have different lengths
    return encoded


def both(local: AutoModelForCausalLM, model: DistributedModelForCausalLM, seed: int | None = None, **kwargs: Any):
    """``generate(**kwargs)`` locally and on the swarm, each after seeding torch the same way."""
    results = []
    for m in (local, model):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(m.generate(**kwargs))
    return results


def test_attributes_are_those_of_a_local_model(model, local):
    assert model.config.vocab_size == local.config.vocab_size
    assert model.generation_config.eos_token_id == local.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == local.generation_config.pad_token_id
    assert model.device == torch.device("cpu")
    assert model.can_generate()


def test_left_padded_batch_greedy_matches_local_exactly(model, local, batch):
    expected, got = both(local, model, **batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    # The short row comes out as it does alone: its padding is masked on the providers.
    short = {k: v[1:2, -2:] for k, v in batch.items()}
    assert torch.equal(model.generate(**short, max_new_tokens=10, do_sample=False)[0], got[1, -12:])


def test_right_padding_is_masked_as_locally(model, local, tokenizer):
    encoded = dict(tokenizer(TEXTS[:2], padding=True, padding_side="right", return_tensors="pt"))
    encoded.pop("token_type_ids", None)
    expected, got = both(local, model, **encoded, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_logits_processors_and_length_limits_match_local(model, local, batch):
    kwargs = dict(
        max_length=batch["input_ids"].shape[1] + 9,
        min_new_tokens=6,
        repetition_penalty=1.7,
        no_repeat_ngram_size=2,
        bad_words_ids=[[5], [7, 8]],
        do_sample=False,
    )
    expected, got = both(local, model, **batch, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("num_beams,returned", [(3, 1), (4, 2)])
def test_beam_search_matches_local_exactly(model, local, batch, num_beams, returned):
    kwargs = dict(
        max_new_tokens=8,
        num_beams=num_beams,
        num_return_sequences=returned,
        length_penalty=0.8,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    expected, got = both(local, model, **batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


def test_seeded_sampling_matches_local(model, local, batch):
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2)
    expected, got = both(local, model, seed=1234, **batch, **kwargs)
    assert torch.equal(got, expected)
    again = both(local, model, seed=99, **batch, **kwargs, num_return_sequences=2)
    assert torch.equal(again[1], again[0])


def test_scores_and_logits_in_return_dict_match_local(model, local, batch):
    kwargs = dict(
        max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    expected, got = both(local, model, **batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 5
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(mine), finite)
        torch.testing.assert_close(mine[finite], theirs[finite], atol=1e-4, rtol=0)


def test_streamers_see_the_new_tokens(model, tokenizer):
    prompt = tokenizer("The swarm serves", return_tensors="pt").input_ids
    printed: list[str] = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            printed.append(text)

    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, streamer=Capture(tokenizer, skip_prompt=True))
    new_text = tokenizer.decode(tokens[0, prompt.shape[1] :])
    assert "".join(printed) == new_text

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = Thread(target=model.generate, kwargs=dict(inputs=prompt, max_new_tokens=8, streamer=streamer))
    thread.start()
    assert "".join(streamer) == new_text
    thread.join()


def test_stopping_criteria_and_stop_strings_end_generation_as_locally(model, local, tokenizer):
    prompt = tokenizer("The swarm serves", return_tensors="pt").input_ids
    full = model.generate(prompt, max_new_tokens=12, do_sample=False)
    stop_text = tokenizer.decode(full[0, prompt.shape[1] + 3 : prompt.shape[1] + 5])
    expected, got = both(local, model, inputs=prompt, max_new_tokens=12, stop_strings=stop_text, tokenizer=tokenizer)
    assert torch.equal(got, expected) and got.shape[1] < full.shape[1]

    class AfterFour(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt.shape[1] + 4)

    stopped = model.generate(prompt, max_new_tokens=12, stopping_criteria=StoppingCriteriaList([AfterFour()]))
    assert torch.equal(stopped, full[:, : prompt.shape[1] + 4])


def test_eos_and_pad_come_from_the_generation_config(model, local, batch):
    eos = int(model.generate(**batch, max_new_tokens=3, do_sample=False)[0, -2])
    expected, got = both(local, model, **batch, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert int(got[0, -1]) == model.generation_config.pad_token_id  # row 0 ended: padded after its eos


def test_what_local_refuses_is_refused(model, batch):
    with pytest.raises((TypeError, ValueError)):  # local generate's second positional is a GenerationConfig
        model.generate(batch["input_ids"], 5)
    with pytest.raises(ValueError, match="token_type_ids"):
        model.generate(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), max_new_tokens=2)


def test_a_padded_session_continues_exactly(model, local, batch):
    expected = local.generate(**batch, max_new_tokens=9, do_sample=False)
    width = batch["input_ids"].shape[1]
    with model.inference_session(max_length=width + 9, batch_size=3) as session:
        first = model.generate(**batch, max_new_tokens=4, do_sample=False, session=session)
        rest = model.generate(None, max_new_tokens=5, do_sample=False, session=session)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


def test_a_session_after_beam_search_cannot_continue(model, batch):
    with model.inference_session(max_length=40, batch_size=6) as session:
        model.generate(**batch, max_new_tokens=2, num_beams=2, session=session)
        with pytest.raises(HivemartError, match="beam search"):
            model.generate(None, max_new_tokens=2, session=session)
