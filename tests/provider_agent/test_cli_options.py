"""``hivemart-provider run`` options that the Sell page's command relies on."""

from __future__ import annotations

import click
import pytest
import torch

from provider_agent.cli import _parse_device


def test_device_auto_is_the_gpu_when_torch_sees_one_else_the_cpu() -> None:
    assert _parse_device(None, None, "auto") == ("cuda" if torch.cuda.is_available() else "cpu")  # type: ignore[arg-type]


def test_an_unknown_device_is_refused_with_the_choices() -> None:
    with pytest.raises(click.BadParameter, match="cpu, cuda or cuda:N"):
        _parse_device(None, None, "tpu")  # type: ignore[arg-type]
