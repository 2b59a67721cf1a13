"""The gateway through OpenAI's own Python client, over the shared two-provider swarm (free mode)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from hivemart_core.models import load_tokenizer
from tests.serve.conftest import GATEWAY_KEY

pytestmark = [pytest.mark.swarm]

PROMPT = "The swarm answers"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who serves the blocks?"}]


@pytest.fixture(scope="module")
def client(gateway: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway[0], api_key=GATEWAY_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def local_greedy(tiny_model: Path, local: Any, ids: list[int], new: int) -> tuple[str, int]:
    """Local transformers' greedy answer to ``ids``: its text and how many tokens it generated."""
    tokenizer = load_tokenizer(tiny_model)
    out = local.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generated = out[0, len(ids) :].tolist()
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def chat_ids(tiny_model: Path) -> list[int]:
    ids = load_tokenizer(tiny_model).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_models_lists_the_served_model(client: openai.OpenAI, served: Any) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    extra = models[0].model_extra or {}
    assert extra["hivemart"]["price_per_million_tokens"] == 0 and extra["context_length"] == served.context
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completions_match_local_transformers_and_count_usage(
    client: openai.OpenAI, tiny_model: Path, local: Any
) -> None:
    tokenizer = load_tokenizer(tiny_model)
    prompt_ids = tokenizer(PROMPT).input_ids
    text, new = local_greedy(tiny_model, local, prompt_ids, 8)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text == text
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), new)
    assert answer.usage.total_tokens == len(prompt_ids) + new
    assert answer.choices[0].finish_reason == ("length" if new == 8 else "stop")

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_chat_uses_the_models_template(client: openai.OpenAI, tiny_model: Path, local: Any) -> None:
    ids = chat_ids(tiny_model)
    text, new = local_greedy(tiny_model, local, ids, 10)
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == text
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), new)

    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_stop_n_and_seed(client: openai.OpenAI, tiny_model: Path, local: Any) -> None:
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), full  # the tiny model's greedy text has something to stop at
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    def sampled(seed: int) -> list[str]:
        answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=seed, temperature=1.5)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert answer.usage is not None
        if all(c.finish_reason == "length" for c in answer.choices):
            assert answer.usage.completion_tokens == 18
        assert answer.usage.completion_tokens <= 18
        return [c.text for c in answer.choices]

    assert sampled(7) == sampled(7)


def test_bad_keys_are_401(gateway: tuple[str, Any]) -> None:
    for key in ("wrong-key", "x" * 600):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=gateway[0], api_key=key, max_retries=0).models.list()
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    missing = httpx.post(f"{gateway[0]}/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_have_openais_shape(client: openai.OpenAI, gateway: tuple[str, Any], served: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=3)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=served.context)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    for response in (
        httpx.post(f"{gateway[0]}/completions", content=b"{not json", headers=headers),
        httpx.get(f"{gateway[0]}/completions", headers=headers),
        httpx.get(f"{gateway[0]}/embeddings", headers=headers),
    ):
        assert response.status_code in (400, 404, 405) and set(response.json()["error"]) >= {"message", "type"}


def test_eight_concurrent_streams_share_the_swarm(client: openai.OpenAI, tiny_model: Path, local: Any) -> None:
    tokenizer = load_tokenizer(tiny_model)
    prompts = [f"{PROMPT} question {i}" for i in range(8)]
    expected = [local_greedy(tiny_model, local, tokenizer(p).input_ids, 6)[0] for p in prompts]
    texts: list[str | None] = [None] * 8
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=6, temperature=0, stream=True
            )
            texts[i] = "".join(c.choices[0].text for c in chunks if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and texts == expected


def test_a_client_that_disconnects_stops_its_generation(client: openai.OpenAI, gateway: tuple[str, Any]) -> None:
    app = gateway[1]
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away after its first chunk
    deadline = time.monotonic() + 60
    while not app.state.gateway.recent or app.state.gateway.recent[-1]["status"] != "cancelled":
        assert time.monotonic() < deadline, list(app.state.gateway.recent)
        time.sleep(0.1)
    outcome = app.state.gateway.recent[-1]  # recorded once the worker stopped
    assert outcome["cancelled"] and 1 <= outcome["completion_tokens"] < 400 and not app.state.gateway.active
