"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions``, validated field by field.

Every field is checked for its type, range and size before anything runs, and an error names
the field (OpenAI's ``param``). Fields OpenAI defines that this gateway cannot honour (``tools``,
``logprobs``, penalties other than 0, ...) are refused rather than silently ignored, so a client
never gets an answer to a question it did not ask; fields nobody defines are refused too.
``null`` means "the default", as in OpenAI's API.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from hivemart.serve.errors import OpenAIError, bad_request

__all__ = ["GenerationRequest", "parse_body", "parse_completion", "parse_chat", "MAX_BODY_BYTES", "MAX_N"]

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is parsed
MAX_N = 8  # choices per request: each is a row of the swarm session's batch
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 512
MAX_TEXT_CHARS = 400_000  # a prompt or message longer than this cannot fit any context anyway
MAX_SEED = 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")

# Accepted only with the value that means "off" (what this gateway does anyway).
_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "parallel_tool_calls": (False, True),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "best_of"} | set(_OFF)
_CHAT_FIELDS = (
    _COMMON | {"messages", "max_completion_tokens", "response_format", "tool_choice", "metadata", "store"} | set(_OFF)
)


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, validated; ``prompt`` or ``messages`` (chat) says what to continue."""

    kind: str  # "completion" or "chat"
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None  # None: up to the context (chat) ; completions default to 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; 413 when too large, 400 when not a JSON object."""
    if len(raw) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return body


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request(
                "prompt", "send one prompt string per request (a list holding exactly one string is accepted)"
            )
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt", "is required: a non-empty string")
    _check_text("prompt", prompt)
    common = _common(body)
    best_of = body.get("best_of")
    if best_of is not None and (_int("best_of", best_of, 1, MAX_N) != common["n"]):
        raise bad_request("best_of", "is not supported other than equal to n")
    max_tokens = _optional_int(body, "max_tokens", 1, 1 << 20)
    return GenerationRequest(
        kind="completion", prompt=prompt, max_tokens=16 if max_tokens is None else max_tokens, **common
    )


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "is required: a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise bad_request("messages", f"holds {len(messages)} messages; at most {MAX_MESSAGES} are accepted")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    format_ = body.get("response_format")
    if format_ is not None and format_ != {"type": "text"}:
        raise bad_request("response_format", 'only {"type": "text"} is supported')
    if body.get("tool_choice") not in (None, "none"):
        raise bad_request("tool_choice", "tools are not supported by this gateway")
    for name in ("metadata", "store"):
        if body.get(name) not in (None, False, {}):
            raise bad_request(name, "is not supported by this gateway")
    max_tokens = _optional_int(body, "max_completion_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, 1 << 20)
    return GenerationRequest(kind="chat", messages=parsed, max_tokens=max_tokens, **_common(body))


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(unknown[0], "unrecognized request argument", code="unknown_parameter")
    for name, allowed in _OFF.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise bad_request(name, f"is not supported by this gateway (leave it out, or send {allowed[0]!r})")


def _common(body: dict[str, Any]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise bad_request("model", "is required: the name of a model (GET /v1/models lists them)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options", 'must be an object with only "include_usage"')
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad_request("stream_options.include_usage", "must be a boolean")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise bad_request("user", "must be a string of at most 256 characters")
    seed = body.get("seed")
    return {
        "model": model,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _top_p(body),
        "n": _int("n", body.get("n", 1) if body.get("n") is not None else 1, 1, MAX_N),
        "stream": stream,
        "include_usage": include_usage,
        "stop": _stop(body.get("stop")),
        "seed": None if seed is None else _int("seed", seed, -MAX_SEED - 1, MAX_SEED),
    }


def _message(index: int, message: Any) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(param, "must be an object with role and content")
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise bad_request(f"{param}.{unknown[0]}", "is not supported (tool calls and other fields are not)")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{param}.role", f"must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts can be read by a text model
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}.content[{j}]", 'only {"type": "text", "text": ...} parts are supported')
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"{param}.content", "must be a string (or a list of text parts)")
    _check_text(f"{param}.content", content)
    name = message.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 64):
        raise bad_request(f"{param}.name", "must be a string of at most 64 characters")
    return {"role": "system" if role == "developer" else role, "content": content}


def _check_text(param: str, text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise bad_request(param, f"is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted")


def _int(param: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(param, f"must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise bad_request(param, f"must be between {low} and {high}, got {value}")
    return value


def _optional_int(body: dict[str, Any], param: str, low: int, high: int) -> int | None:
    value = body.get(param)
    return None if value is None else _int(param, value, low, high)


def _number(body: dict[str, Any], param: str, default: float, low: float, high: float) -> float:
    value = body.get(param)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(param, "must be a number")
    if not low <= value <= high:
        raise bad_request(param, f"must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _top_p(body: dict[str, Any]) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("top_p", "must be greater than 0 (and at most 1)")
    return top_p


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise bad_request("stop", f"holds {len(stops)} sequences; at most {MAX_STOPS} are accepted")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad_request("stop", f"each sequence must be 1 to {MAX_STOP_CHARS} characters long")
    return list(stops)
