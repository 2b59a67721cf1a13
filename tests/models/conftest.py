"""Fixtures for ``hivemart_core.models``: tiny real checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hivemart_core.models import create_model

# Small enough that a checkpoint takes well under a second; shapes still exercise
# multi-head, grouped-query attention and (for qwen2) attention biases.
TINY: dict = dict(hidden=64, layers=3, heads=4, seed=0)
ARCH_SHAPES: dict[str, dict] = {
    "llama": dict(arch="llama", kv_heads=4),
    "mistral": dict(arch="mistral", kv_heads=2),
    "qwen2": dict(arch="qwen2", kv_heads=1),
}


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_model(**overrides)``: a checkpoint of TINY plus overrides, made once per session.

    Shared between tests: tests that modify a checkpoint must copy it first (``copy_model``).
    """
    made: dict[str, Path] = {}

    def make(**overrides: object) -> Path:
        args = {**TINY, **overrides}
        key = json.dumps(args, sort_keys=True)
        if key not in made:
            made[key] = create_model(tmp_path_factory.mktemp("model") / "ckpt", **args)
        return made[key]

    return make


@pytest.fixture
def copy_model(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a checkpoint, safe to tamper with."""
    import shutil

    def copy(path: Path) -> Path:
        target = tmp_path / f"copy-{path.parent.name}"
        shutil.copytree(path, target)
        return target

    return copy


def tensor_span(file: Path, name: str) -> tuple[int, int]:
    """Absolute byte offsets ``[start, end)`` of tensor ``name``'s data in a safetensors file."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    begin, end = header[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def flip_byte(file: Path, name: str, offset_in_tensor: int = 5) -> None:
    """Change one byte of tensor ``name`` in place (size unchanged)."""
    start, end = tensor_span(file, name)
    position = start + offset_in_tensor
    assert position < end
    with open(file, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x01]))
