"""What the server keeps about an open inference session, shared by the parts that serve
sessions (``sessions``) and relay their steps between providers (``relay``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from hivemart_core.models.adapters import Adapter
from hivemart_core.models.backend import SpanKVCache
from hivemart_core.protocol.commitments import StepRecord
from hivemart_core.protocol.rpc import OpenSession
from hivemart_core.protocol.tickets import JobTicket


@dataclass(frozen=True)
class Delivered:
    """A step's output as delivered, kept to answer a duplicate of the step the same way."""

    step_id: int
    position: int
    output: torch.Tensor
    record: StepRecord  # what we signed about the step
    input_record: StepRecord | None  # the pusher's record of our input (None: the client sent it)

    def header(self) -> dict[str, Any]:
        header = {"type": "output", "step_id": self.step_id, "position": self.position, "record": self.record.to_dict()}
        if self.input_record is not None:
            header["input_record"] = self.input_record.to_dict()
        return header


@dataclass
class Session:
    spec: OpenSession
    cache: SpanKVCache
    reserved_bytes: int
    client: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recent_steps: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last_output: Delivered | None = None
    last_step_id: int = -1  # the highest step id computed: an older one is never computed (signed) again
    last_used: float = field(default_factory=time.monotonic)
    ticket: JobTicket | None = None  # what pays for the session (None in free mode)
    peer: str = ""  # the client that opened it (its quotas count the session)
    adapter: Adapter | None = None  # the LoRA adapter every step applies (OpenSession.adapter_id)
    # Signed into every step record: records of a session reopened under the same id differ.
    instance: str = field(default_factory=lambda: secrets.token_hex(8))
