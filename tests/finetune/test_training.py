"""Training through real providers: LoRA memorises, exports to PEFT, resumes, stays isolated."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from client_sdk.finetune import FineTuner, TrainConfig, train
from client_sdk.finetune.data import PackedDataset, load_texts
from client_sdk.finetune.peft_export import load_peft_weights
from client_sdk.swarm.remote import RemoteLora
from hivemart_core.models import load_config, load_tokenizer
from hivemart_core.models.lora import LoraSpec, target_shapes
from tests.finetune.conftest import local_peft, make_lora

pytestmark = pytest.mark.swarm

TEXTS = [
    "The swarm trains adapters on remote blocks.",
    "Providers keep each job's adapter apart from every other job.",
    "Gradients come back from rpc_backward for every hop.",
    "A killed provider never corrupts the optimizer step.",
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def lora_run(model, data_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """30 LoRA steps on four sentences; returns the result and the exported adapter."""
    out = tmp_path_factory.mktemp("adapter")
    config = TrainConfig(
        mode="lora",
        steps=30,
        lr=1e-2,
        batch_size=4,
        seq_len=16,
        rank=8,
        alpha=16.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    result = train(model, data_file, config, out_dir=out, progress=False)
    return result, out


def test_thirty_lora_steps_cut_the_loss_at_least_in_half(lora_run):
    result, _ = lora_run
    assert result.steps == 30 and len(result.losses) == 30
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last <= first / 2, result.losses


def test_exported_adapter_loaded_with_peft_gives_the_distributed_logits(lora_run, model, tiny_model: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = lora_run
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = load_tokenizer(tiny_model)(TEXTS[:2], return_tensors="pt", padding=True).input_ids

    config = json.loads((out / "adapter_config.json").read_text())
    spec = LoraSpec(config["r"], float(config["lora_alpha"]), tuple(sorted(config["target_modules"])))
    shapes = target_shapes(load_config(tiny_model))
    lora = RemoteLora(spec, shapes, 4, weights=load_peft_weights(spec, shapes, 4, out))
    with torch.no_grad():
        distributed = model(ids, lora=lora)
        local = peft_model(input_ids=ids).logits
    assert lora.weights.abs().sum() > 0
    torch.testing.assert_close(distributed, local, atol=1e-4, rtol=0)
    model.runtime.run(lora.release(model.runtime.p2p))


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_learns_and_resumes_exactly(model, data_file: Path, tmp_path: Path, mode: str):
    tokenizer = load_tokenizer(model.info.path)
    dataset = PackedDataset.from_texts(load_texts(data_file), tokenizer, 16, seed=0)
    config = TrainConfig(mode=mode, steps=6, lr=5e-2, batch_size=4, seq_len=16, prefix_len=4, checkpoint_every=3)

    straight = FineTuner(model, config)
    result = straight.fit(dataset, progress=False)
    assert result.losses[-1] < result.losses[0]

    interrupted = FineTuner(model, TrainConfig(**{**config.__dict__, "steps": 3}))
    interrupted.fit(dataset, checkpoint_dir=tmp_path, progress=False)
    resumed = FineTuner(model, config)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 3
    resumed.fit(dataset, checkpoint_dir=tmp_path, progress=False)
    assert resumed.losses == pytest.approx(result.losses, abs=1e-5)
    for name, tensor in straight.named_parameters().items():
        torch.testing.assert_close(resumed.named_parameters()[name], tensor, atol=1e-5, rtol=1e-4)
    if mode == "deep_ptune":
        assert straight.deep_prompts.abs().sum() > 0  # the providers' prompt gradients arrived
    out = resumed.export(tmp_path / "out")
    assert (out / "prompts.safetensors").is_file()


def test_two_concurrent_jobs_with_different_adapters_stay_isolated(model, tiny_model: Path, local_model):
    ids = torch.randint(3, 2048, (2, 10), generator=torch.Generator().manual_seed(5))
    adapters = [make_lora(tiny_model, seed=1, random_b=True), make_lora(tiny_model, seed=2, random_b=True)]
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def job(index: int) -> None:
        try:
            for _ in range(3):
                with torch.no_grad():
                    outputs[index].append(model(ids, lora=adapters[index]))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    with torch.no_grad():
        base = [model(ids) for _ in range(3)]  # no adapter, at the same time
    for t in threads:
        t.join()
    assert not errors, errors
    with torch.no_grad():
        expected_base = local_model(ids).logits
        expected = [local_peft(tiny_model, lora)(input_ids=ids).logits for lora in adapters]
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    for index in range(2):
        for logits in outputs[index]:
            torch.testing.assert_close(logits, expected[index], atol=1e-4, rtol=0)
    for logits in base:
        torch.testing.assert_close(logits, expected_base, atol=1e-4, rtol=0)
    for lora in adapters:
        model.runtime.run(lora.release(model.runtime.p2p))


def test_cli_trains_checkpoints_and_resumes(swarm, tiny_model: Path, data_file: Path, tmp_path: Path):
    from click.testing import CliRunner

    from hivemart.cli import cli

    args = [
        "finetune",
        "--model",
        str(tiny_model),
        "--mode",
        "lora",
        "--data",
        str(data_file),
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--rank",
        "4",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--checkpoint-every",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--json",
        *[a for peer in swarm.initial_peers for a in ("--initial-peers", peer)],
    ]
    first = CliRunner().invoke(cli, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["mode"] == "lora"
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2

    second = CliRunner().invoke(cli, [*args, "--steps", "4", "--resume"])
    assert second.exit_code == 0, second.output
    resumed = json.loads(second.output.strip().splitlines()[-1])
    assert resumed["steps"] == 4 and resumed["first_loss"] == summary["first_loss"]
    assert torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)["step"] == 4
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    bad = CliRunner().invoke(cli, [*args, "--steps", "1", "--targets", "nonsense"])
    assert bad.exit_code != 0 and "unknown target" in bad.output
