"""Fine-tuning through the swarm: prompt tuning, deep prompt tuning and LoRA.

- :mod:`hivemart_core.models.lora`: the LoRA layout clients and providers share.
- :mod:`client_sdk.finetune.peft_export`: save a trained adapter in PEFT's format.
- :class:`FineTuner` / :func:`train` (in :mod:`client_sdk.finetune.trainer`): the training loop.

The trainer is imported lazily: providers import :mod:`hivemart_core.models.lora` without
pulling in the client's swarm stack.

Example::

    from client_sdk.finetune import TrainConfig, train
    from client_sdk.swarm.model import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained("path/to/model", initial_peers=[maddr])
    result = train(model, "data.jsonl", TrainConfig(mode="lora", steps=30, lr=1e-3, rank=8),
                   checkpoint_dir="ckpt", resume=True, out_dir="adapter")
    # adapter/ loads with peft.PeftModel.from_pretrained(AutoModelForCausalLM..., "adapter")

Lower level: ``model(input_ids, lora=RemoteLora(...), deep_prompts=...)`` is differentiable
with respect to the adapter's master weights and the prompts (see
:class:`client_sdk.swarm.remote.RemoteBlocks`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FineTuner", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from client_sdk.finetune import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
