"""PEFT LoRA adapters through the gateway: model ``"<model>:<adapter>"`` answers exactly as local
PEFT does, the base model's name still answers as the base model, ``/v1/models`` lists both, an
unknown adapter is OpenAI's 404, and ``hivemart serve --adapter`` refuses bad values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from hivemart.cli import cli
from hivemart_core.models import load_tokenizer
from tests.serve.conftest import GATEWAY_KEY, running
from tests.serve.test_cli import PEER

PROMPT = "An adapter changes what the swarm says"
MESSAGES = [{"role": "user", "content": "Who serves the blocks?"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 8


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


def _greedy(tiny_model: Path, local: Any, ids: list[int]) -> str:
    """Local greedy text for ``ids`` (stopping at end of sequence, as the gateway does)."""
    tokenizer = load_tokenizer(tiny_model)
    with torch.inference_mode():
        out = local.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))


@pytest.fixture(scope="module")
def adapter_gateway(tiny_model: Path, two_provider_swarm: LocalSwarm, peft_dir: Path) -> Iterator[tuple[str, Any]]:
    """A gateway serving ``tiny`` and ``tiny:lora``: (base URL, the served model after shutdown)."""
    from hivemart.serve.app import create_app
    from hivemart.serve.engine import Served

    served = Served.load(tiny_model, initial_peers=list(two_provider_swarm.initial_peers), name="tiny")
    served.add_adapter("lora", peft_dir)
    with running(create_app(served, api_key=GATEWAY_KEY)) as url:
        yield url, served
    # Shut down: the adapters were released with the model.
    assert served.adapters == {}


@pytest.fixture(scope="module")
def client(adapter_gateway: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=adapter_gateway[0], api_key=GATEWAY_KEY, max_retries=0, timeout=120)


@pytest.mark.swarm
def test_an_adapter_model_answers_as_local_peft_and_the_base_as_the_base(
    client: openai.OpenAI, tiny_model: Path, peft_dir: Path
) -> None:
    from peft import PeftModel

    tokenizer = load_tokenizer(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT).input_ids
    base_text = _greedy(tiny_model, base, prompt_ids)
    local_peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(peft_dir)
    ).eval()
    lora_text = _greedy(tiny_model, local_peft, prompt_ids)
    assert lora_text != base_text  # the adapter matters

    answer = client.completions.create(model="tiny:lora", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert answer.choices[0].text == lora_text and answer.model == "tiny:lora"
    base_answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert base_answer.choices[0].text == base_text and base_answer.model == "tiny"

    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    chunks = client.chat.completions.create(
        model="tiny:lora",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == _greedy(tiny_model, local_peft, chat_ids)


@pytest.mark.swarm
def test_models_lists_the_adapters_and_unknown_adapters_are_404(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny:lora"]
    prices = [(m.model_extra or {})["hivemart"]["price_per_million_tokens"] for m in models]
    assert prices == [0, 0]
    assert client.models.retrieve("tiny:lora").id == "tiny:lora"
    for name in ("tiny:other", "other:lora", "tiny:"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=name, prompt=PROMPT, max_tokens=1)
        assert caught.value.code == "model_not_found" and "tiny:lora" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny:other")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lora", "NAME=DIR"),
        ("=DIR", "NAME=DIR"),
        ("bad name=.", "NAME=DIR"),
        ("a:b=.", "NAME=DIR"),
        ("x" * 65 + "=.", "NAME=DIR"),
        ("lora=/nonexistent/adapter", "is not a directory"),
    ],
)
def test_bad_adapter_values_are_refused(tiny_model: Path, value: str, message: str) -> None:
    argv = ["serve", "--model", str(tiny_model), "--initial-peers", PEER, "--open", "--adapter", value]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and message in result.output


def test_a_repeated_adapter_name_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    argv = ["serve", "--model", str(tiny_model), "--initial-peers", PEER, "--open"]
    argv += ["--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and "given twice" in result.output


@pytest.mark.swarm
def test_a_directory_that_is_not_a_peft_lora_stops_the_gateway_at_start(
    tiny_model: Path, two_provider_swarm: LocalSwarm, tmp_path: Path
) -> None:
    argv = ["serve", "--model", str(tiny_model), "--open", "--adapter", f"lora={tmp_path}"]
    argv += [a for peer in two_provider_swarm.initial_peers for a in ("--initial-peers", peer)]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"Error: --adapter lora={tmp_path}: "), result.output
