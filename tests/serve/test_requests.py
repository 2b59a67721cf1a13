"""Request validation and the choices' text, without a swarm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hivemart.serve.engine import Choices
from hivemart.serve.errors import OpenAIError
from hivemart.serve.requests import MAX_BODY_BYTES, parse_body, parse_chat, parse_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def refused(parse: Any, body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("temperature", True),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 9),
        ("n", 1.0),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", "10"),
        ("seed", 2**64),
        ("seed", "1"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stop", ["x" * 257]),
        ("stop", 7),
        ("stream", "yes"),
        ("logprobs", True),
        ("presence_penalty", 0.5),
        ("tools", [{"type": "function"}]),
        ("temperatur", 1),
        ("user", 5),
    ],
)
def test_every_field_is_checked_and_named(field: str, value: Any) -> None:
    for parse, base in ((parse_chat, CHAT), (parse_completion, COMPLETION)):
        error = refused(parse, {**base, field: value})
        assert error.param == field and error.body()["error"]["param"] == field


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        [{"role": "user", "content": "hi", "tool_calls": []}],
        [{"role": "user", "content": "x" * 400_001}],
    ],
)
def test_chat_messages_are_checked(messages: Any) -> None:
    error = refused(parse_chat, {**CHAT, "messages": messages})
    assert error.param is not None and error.param.startswith("messages")


def test_prompts_models_and_options() -> None:
    for prompt in (None, "", ["a", "b"], [1, 2], 5):
        assert refused(parse_completion, {**COMPLETION, "prompt": prompt}).param == "prompt"
    assert refused(parse_completion, {"prompt": "hi"}).param == "model"
    assert (
        refused(parse_completion, {**COMPLETION, "stream_options": {"include_usage": True}}).param == "stream_options"
    )
    assert refused(parse_chat, {**CHAT, "response_format": {"type": "json_object"}}).param == "response_format"
    ok = parse_completion({**COMPLETION, "prompt": ["one"], "stop": "x", "temperature": None, "n": None})
    assert (ok.prompt, ok.stop, ok.temperature, ok.n, ok.max_tokens) == ("one", ["x"], 1.0, 1, 16)
    chat = parse_chat({**CHAT, "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    assert (chat.max_tokens, chat.include_usage, chat.messages) == (5, True, [{"role": "user", "content": "hi"}])
    parts = parse_chat({**CHAT, "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}]})
    assert parts.messages == [{"role": "system", "content": "a"}]


def test_bodies_must_be_small_json_objects() -> None:
    for raw in (b"{", b"[1]", b"\xff", b"null"):
        with pytest.raises(OpenAIError) as caught:
            parse_body(raw)
        assert caught.value.status == 400
    with pytest.raises(OpenAIError) as caught:
        parse_body(json.dumps({"prompt": "x" * MAX_BODY_BYTES}).encode())
    assert caught.value.status == 413


def test_choices_stop_at_stop_strings_and_hold_back_their_start(tiny_model: Path) -> None:
    from hivemart_core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer("The swarm answers every question").input_ids
    choices = Choices(tokenizer, 1, ["every"], tokenizer.eos_token_id)
    streamed = ""
    for token in ids:
        for _, text, _ in choices.push([token]):
            streamed += text
            assert "every" not in streamed
        if choices.done:
            break
    assert choices.done and choices.choices[0].finish == "stop"
    assert streamed == choices.choices[0].text == "The swarm answers "
    assert choices.completion_tokens <= len(ids)

    eos = Choices(tokenizer, 2, [], tokenizer.eos_token_id)
    eos.push([ids[0], tokenizer.eos_token_id])
    eos.push([ids[1], tokenizer.eos_token_id])  # the second choice ended: its column is ignored
    rest = eos.finish_all()
    assert [c.finish for c in eos.choices] == ["length", "stop"] and [c.tokens for c in eos.choices] == [2, 1]
    assert rest == [(0, "", "length")] and eos.completion_tokens == 3
