"""The fine-tuning loop: prompt tuning, deep prompt tuning or LoRA, through the swarm.

Modes (every trainable tensor lives on the client, with the AdamW state):

- ``ptune``: ``prefix_len`` trainable prompt embeddings are prepended to every row's token
  embeddings; nothing changes on the providers.
- ``deep_ptune``: the same, plus deep prompts ``[num_blocks, 1, prefix_len, hidden]`` (zeros
  at first) that every block adds to its first ``prefix_len`` positions (Petals' method).
- ``lora``: a LoRA adapter on the ``targets`` layers of every block (PEFT's initialisation
  from ``seed``); providers hold copies of their spans' weights and return their gradients.

The loss is next-token cross-entropy over the text positions. A checkpoint (``state.pt`` in
the checkpoint directory) holds the trainable tensors, the optimizer state, the step and
the losses; resuming continues with the batch the next step would have had.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hivemind.utils.logging import get_logger

from client_sdk.finetune.data import PackedDataset, load_texts
from client_sdk.finetune.peft_export import save_peft_adapter
from client_sdk.swarm.model import DistributedModelForCausalLM
from client_sdk.swarm.remote import RemoteLora
from hivemart_core.errors import HivemartError
from hivemart_core.models import load_config, load_tokenizer
from hivemart_core.models.lora import LoraSpec, target_shapes

__all__ = ["MODES", "TrainConfig", "TrainResult", "FineTuner", "train"]

logger = get_logger(__name__)

MODES = ("ptune", "deep_ptune", "lora")
CHECKPOINT_FILE = "state.pt"


@dataclass
class TrainConfig:
    """What to train and how."""

    mode: str = "lora"  # ptune | deep_ptune | lora
    steps: int = 30  # optimizer steps in all (a resumed run counts the steps already done)
    lr: float = 1e-3
    batch_size: int = 8  # rows per step
    seq_len: int = 128  # tokens per row
    weight_decay: float = 0.0
    seed: int = 0  # adapter / prompt initialisation and data order
    prefix_len: int = 16  # prompt tokens (ptune, deep_ptune)
    rank: int = 8  # LoRA rank, alpha and target layers (lora)
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end) when a directory is set

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len", "prefix_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be a positive number")
        self.targets = tuple(self.targets)
        if self.mode == "lora":
            LoraSpec(self.rank, self.alpha, self.targets)  # validates


@dataclass
class TrainResult:
    steps: int  # the step count reached
    losses: list[float] = field(default_factory=list)  # per step, including resumed ones
    seconds_per_step: float = 0.0  # median over the steps this run did
    out_dir: str | None = None


class FineTuner:
    """Trains a :class:`DistributedModelForCausalLM` in one of :data:`MODES`."""

    def __init__(self, model: DistributedModelForCausalLM, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.step = 0
        self.losses: list[float] = []
        hidden = model.info.hidden_size
        generator = torch.Generator().manual_seed(config.seed)
        self.prompts: torch.nn.Parameter | None = None
        self.deep_prompts: torch.nn.Parameter | None = None
        self.lora: RemoteLora | None = None
        if config.mode in ("ptune", "deep_ptune"):
            scale = float(model.parts.embed_tokens.weight.float().std())
            self.prompts = torch.nn.Parameter(torch.randn(config.prefix_len, hidden, generator=generator) * scale)
        if config.mode == "deep_ptune":
            self.deep_prompts = torch.nn.Parameter(torch.zeros(model.info.num_blocks, 1, config.prefix_len, hidden))
        if config.mode == "lora":
            spec = LoraSpec(config.rank, config.alpha, config.targets)
            self.lora = RemoteLora(
                spec, target_shapes(load_config(model.info.path)), model.info.num_blocks, seed=config.seed
            )
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def parameters(self) -> list[torch.nn.Parameter]:
        lora = None if self.lora is None else self.lora.weights
        return [p for p in (self.prompts, self.deep_prompts, lora) if p is not None]

    def named_parameters(self) -> dict[str, torch.Tensor]:
        named = {
            "prompts": self.prompts,
            "deep_prompts": self.deep_prompts,
            "lora": None if self.lora is None else self.lora.weights,
        }
        return {k: v for k, v in named.items() if v is not None}

    # --- computing ------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for the text positions of ``input_ids`` [batch, tokens] with the trained parts."""
        model = self.model
        hidden = model.parts.embed(input_ids)
        prefix = 0
        if self.prompts is not None:
            prefix = self.prompts.shape[0]
            prompts = self.prompts.to(hidden.dtype)[None].expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([prompts, hidden], dim=1)
        hidden = model.run_blocks(hidden, deep_prompts=self.deep_prompts, lora=self.lora)
        return model.parts.logits(hidden[:, prefix:])

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.logits(input_ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())

    def train_step(self, input_ids: torch.Tensor) -> float:
        """One optimizer step on ``input_ids``; returns the loss before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(input_ids)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def fit(
        self, dataset: PackedDataset, *, checkpoint_dir: str | Path | None = None, progress: bool = True
    ) -> TrainResult:
        """Train until ``config.steps`` steps are done, checkpointing on the way."""
        from hivemart_core.logs import progress as show_progress

        config = self.config
        durations = []
        # A bar on a terminal; plain periodic lines in a log file or a pipe.
        bar = show_progress(config.steps, f"finetune {config.mode}", unit="step", initial=self.step, enabled=progress)
        try:
            while self.step < config.steps:
                batch = dataset.batch(self.step, config.batch_size)
                started = time.perf_counter()
                loss = self.train_step(batch)
                durations.append(time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if checkpoint_dir is not None and (
                    self.step % config.checkpoint_every == 0 or self.step == config.steps
                ):
                    self.save_checkpoint(checkpoint_dir)
        finally:
            bar.close()
        median = sorted(durations)[len(durations) // 2] if durations else 0.0
        return TrainResult(steps=self.step, losses=list(self.losses), seconds_per_step=median)

    # --- checkpoints and export --------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write ``state.pt`` atomically (a crash leaves the previous checkpoint intact)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": "hivemart-finetune-v1",
            "model_id": self.model.info.model_id,
            "config": asdict(self.config),
            "step": self.step,
            "losses": self.losses,
            "params": {k: v.detach().clone() for k, v in self.named_parameters().items()},
            "optimizer": self.optimizer.state_dict(),
        }
        target = directory / CHECKPOINT_FILE
        temporary = directory / f".{CHECKPOINT_FILE}.tmp"
        torch.save(state, temporary)
        os.replace(temporary, target)
        return target

    def load_checkpoint(self, directory: str | Path) -> None:
        """Continue from ``state.pt``; the mode, shapes and model must match this run's."""
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise HivemartError(f"no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != "hivemart-finetune-v1":
            raise HivemartError(f"{path} is not a Hivemart fine-tuning checkpoint")
        if state["model_id"] != self.model.info.model_id:
            raise HivemartError(f"{path} was trained on {state['model_id']}, not {self.model.info.model_id}")
        saved = state["config"]
        for key in ("mode", "prefix_len", "rank", "alpha", "targets"):
            if key in saved and _plain(saved[key]) != _plain(getattr(self.config, key)):
                raise HivemartError(f"{path} has {key}={saved[key]!r}, this run {getattr(self.config, key)!r}")
        params = self.named_parameters()
        if set(state["params"]) != set(params):
            raise HivemartError(f"{path} holds {sorted(state['params'])}, expected {sorted(params)}")
        with torch.no_grad():
            for name, tensor in state["params"].items():
                if tensor.shape != params[name].shape:
                    raise HivemartError(
                        f"{path}: {name} has shape {list(tensor.shape)}, expected {list(params[name].shape)}"
                    )
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses = int(state["step"]), [float(x) for x in state["losses"]]

    def export(self, out_dir: str | Path) -> Path:
        """Save the trained parts: a PEFT adapter (lora) or ``prompts.safetensors`` (ptune modes)."""
        out = Path(out_dir)
        if self.lora is not None:
            return save_peft_adapter(
                self.lora.spec, self.lora.shapes, self.lora.weights, out, base_model=self.model.info.path
            )
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().float().contiguous() for k, v in self.named_parameters().items()},
            str(out / "prompts.safetensors"),
        )
        (out / "prompt_config.json").write_text(
            json.dumps(
                {
                    "mode": self.config.mode,
                    "prefix_len": self.config.prefix_len,
                    "model_id": self.model.info.model_id,
                },
                indent=2,
            )
        )
        return out

    def close(self) -> None:
        """Delete the adapter copies the providers hold for this job."""
        if self.lora is not None:
            self.model.runtime.run(self.lora.release(self.model.runtime.p2p))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def train(
    model: DistributedModelForCausalLM,
    data: str | Path | Sequence[str],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` (a JSONL / text file, or a list of texts).

    With ``resume``, continue from ``checkpoint_dir`` when it holds a checkpoint. The trained
    parts are exported to ``out_dir`` at the end; the providers' adapter copies are deleted.
    """
    texts = load_texts(data) if isinstance(data, (str, Path)) else list(data)
    dataset = PackedDataset.from_texts(texts, load_tokenizer(model.info.path), config.seq_len, seed=config.seed)
    tuner = FineTuner(model, config)
    try:
        if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file():
            tuner.load_checkpoint(checkpoint_dir)
            logger.info(f"resumed from {checkpoint_dir} at step {tuner.step}")
        result = tuner.fit(dataset, checkpoint_dir=checkpoint_dir, progress=progress)
        if out_dir is not None:
            result.out_dir = str(tuner.export(out_dir))
        return result
    finally:
        tuner.close()
