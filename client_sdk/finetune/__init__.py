"""Fine-tuning through the swarm: prompt tuning, deep prompt tuning and LoRA.

- :mod:`client_sdk.finetune.lora`: the LoRA layout clients and providers share.
- :mod:`client_sdk.finetune.peft_export`: save a trained adapter in PEFT's format.
- :class:`FineTuner` / :func:`train` (in :mod:`client_sdk.finetune.trainer`): the training loop.

The trainer is imported lazily: providers import :mod:`client_sdk.finetune.lora` without
pulling in the client's swarm stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FineTuner", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from client_sdk.finetune import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
