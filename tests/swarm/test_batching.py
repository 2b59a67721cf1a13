"""Concurrent sessions through the same providers are batched (provider_agent.server.batching)
and each still gets exactly the tokens it gets alone; a session rolling back meanwhile gets
what local generation gives for its new prefix."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from client_sdk.swarm.local import LocalSwarm
from client_sdk.swarm.model import DistributedModelForCausalLM
from hivemart_core.models import load_tokenizer
from hivemart_core.swarm.connection import ProviderConnection
from hivemart_core.swarm.runtime import SwarmRuntime

pytestmark = pytest.mark.swarm

NEW_TOKENS = 12
SESSIONS = 6


def _batch_sizes(runtime: SwarmRuntime, swarm: LocalSwarm) -> list[Counter[int]]:
    infos = [runtime.run(ProviderConnection(runtime.p2p, a.peer_id).info()) for a in swarm.agents]
    assert all(info["batching"]["enabled"] for info in infos)
    return [Counter({int(k): v for k, v in info["batching"]["sizes"].items()}) for info in infos]


def _greedy(local: AutoModelForCausalLM, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return local.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def test_concurrent_sessions_at_different_positions_are_batched_and_exact(
    tiny_model: Path, two_provider_swarm: LocalSwarm, runtime2: SwarmRuntime
) -> None:
    local = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = load_tokenizer(tiny_model)("Concurrent sessions share the providers' forwards", return_tensors="pt").input_ids
    prompts = [ids[:, : ids.shape[1] - i] for i in range(SESSIONS)]  # different lengths: different positions
    model = DistributedModelForCausalLM.from_pretrained(tiny_model, runtime=runtime2)
    rolled_prompt = ids[:, :5]
    before = _batch_sizes(runtime2, two_provider_swarm)

    def rolling_session() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate 6 tokens, go back 3 positions with another token, generate 4 more."""
        with model.inference_session(max_length=rolled_prompt.shape[1] + 12) as session:
            first = model.generate(rolled_prompt, max_new_tokens=6, session=session)
            at = rolled_prompt.shape[1] + 3
            other = (first[:, at : at + 1] + 1) % local.config.vocab_size
            hidden = runtime2.run(session.chain.step(model.parts.embed(other), position=at))
            logits = model.parts.logits(hidden)[:, -1]
            session.last_token = logits.argmax(-1, keepdim=True)
            rest = model.generate(None, max_new_tokens=4, session=session)
            return torch.cat([first[:, :at], other], dim=1), logits, rest

    with ThreadPoolExecutor(SESSIONS + 1) as pool:
        rolling = pool.submit(rolling_session)
        outputs = list(pool.map(lambda p: model.generate(p, max_new_tokens=NEW_TOKENS), prompts))
        prefix, logits, rest = rolling.result()

    for prompt, output in zip(prompts, outputs, strict=True):
        assert torch.equal(output, _greedy(local, prompt, NEW_TOKENS))
    # The rolled-back session continues from its new prefix exactly as local generation does.
    with torch.inference_mode():
        torch.testing.assert_close(logits, local(prefix).logits[:, -1], atol=1e-4, rtol=0)
    expected = _greedy(local, prefix, 5)[:, prefix.shape[1] :]
    assert torch.equal(torch.cat([logits.argmax(-1, keepdim=True), rest], dim=1), expected)

    after = _batch_sizes(runtime2, two_provider_swarm)
    batched = [sum(n for size, n in (a - b).items() if size > 1) for a, b in zip(after, before, strict=True)]
    assert sum(batched) > 0, f"no forward ran more than one session's step: {after}"


def test_the_provider_cli_switches_batching_off(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provider_agent.agent
    from provider_agent.cli import cli

    seen = []
    monkeypatch.setattr(provider_agent.agent, "serve_forever", seen.append)
    base = ["run", "--model", str(tiny_model), "--blocks", "0:1"]
    for args, expected in (([], (True, 64)), (["--no-batching", "--batch-max-sessions", "8"], (False, 8))):
        result = CliRunner().invoke(cli, base + args)
        assert result.exit_code == 0, result.output
        assert (seen[-1].batching, seen[-1].batch_max_sessions) == expected
    result = CliRunner().invoke(cli, [*base, "--batch-max-sessions", "0"])
    assert result.exit_code != 0 and "--batch-max-sessions" in result.output
