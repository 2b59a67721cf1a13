"""Training data for fine-tuning: texts from JSONL or plain text, packed into fixed-length rows.

A file whose first non-empty line is a JSON object is read as JSONL, one object per line,
each with a string ``"text"``; any other file is plain text, one example per non-empty line.
Texts are tokenised, joined with the end-of-sequence token and cut into rows of
``seq_len`` tokens (a stream shorter than that is one shorter row). Rows are visited in a
fresh random order every epoch, derived from the seed alone, so the batch of step ``n`` is
the same whether training ran through or resumed from a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "load_texts", "PackedDataset"]

MAX_FILE_BYTES = 512 * 1024 * 1024


class DataError(ValueError):
    """The training data file is missing, empty or malformed; the message says where."""


def load_texts(path: str | Path) -> list[str]:
    """The texts of a JSONL (``{"text": ...}`` per line) or plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    lines = [line for line in path.read_text(encoding="utf-8", errors="strict").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no text")
    if not lines[0].lstrip().startswith("{"):
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number}: expected an object with a string "text" field')
        texts.append(record["text"])
    return texts


@dataclass
class PackedDataset:
    """Token rows ``[rows, seq_len]`` and a deterministic batch order."""

    rows: torch.Tensor
    seed: int = 0
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: Any, seq_len: int, *, seed: int = 0) -> PackedDataset:
        if seq_len < 2:
            raise DataError("seq_len must be at least 2")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            if eos is not None:
                stream.append(eos)
        if len(stream) < 2:
            raise DataError("the data has fewer than 2 tokens")
        if len(stream) < seq_len:
            rows = torch.tensor([stream])
        else:
            count = len(stream) // seq_len
            rows = torch.tensor(stream[: count * seq_len]).view(count, seq_len)
        return cls(rows, seed)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._orders[epoch] = torch.randperm(len(self.rows), generator=generator)
        return self._orders[epoch]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The rows of optimizer step ``step`` (0-based): epochs of shuffled rows, back to back."""
        count = len(self.rows)
        picks = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, index = divmod(position, count)
            picks.append(int(self._permutation(epoch)[index]))
        return self.rows[picks]
