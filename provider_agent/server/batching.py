"""Decode steps of concurrent inference sessions gathered into one batched forward.

A decode step (one token per session) costs a span of blocks about as much for 16 sessions
as for one: the weights are read once either way. So the provider queues each decode step
and runs everything queued for the same blocks as one forward
(:meth:`hivemart_core.models.backend.SpanBackend.inference_steps`).

When to run a queue (decided on the event loop thread, so no locks):

- a lone session (no other session stepped on these blocks within ``_ACTIVE_S``) runs its
  step at once on the unbatched path, exactly as without batching;
- while a batched forward on these blocks is in flight (in the batcher's own thread, so
  that the loop keeps reading), steps queue; when it ends, everything queued by then goes
  as the next forward, at once;
- otherwise a queue goes at once when every recently active session is in it or it holds
  ``max_sessions`` steps, else after ``window_s`` (1 ms by default) for the stragglers.

Prefill chunks (more than one token), failover replays and steps with batching off take
the unbatched path, through the same queue accounting (so that training still yields to
them). Each session's step keeps everything per session: its cache (and rollback
position), its charge, its signed record; a batch only shares the matrix products.
A session may carry a LoRA adapter (``OpenSession.adapter_id``): the batch key holds the
blocks and the adapter id, so that sessions batch only with sessions applying the same
adapter (or none); a batch's forward applies its adapter to every row.

Training forwards wait before each block while inference steps are queued or running
(:meth:`StepBatcher.wait_for_inference`, at most ``_TRAINING_WAIT_S`` per block so that
training is slowed, never starved).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from hivemart_core.models.backend import LoraWeights, SpanBackend, SpanKVCache

__all__ = ["BatchStats", "StepBatcher"]

_T = TypeVar("_T")
# A session that stepped within this many seconds is expected to step again soon: a queue
# waits (at most the window) for it rather than run without it, and a step is not taken
# for a lone session's. Generous: under load a session's steps come seconds apart, and
# taking them for lone ones would run them one by one; a session idle this long (a person
# reading) costs the others at most the window per step meanwhile.
_ACTIVE_S = 10.0
# A partial queue waits for the rest of the active sessions' steps up to this share of the
# last batched forward's duration (or the window, when longer).
_WAIT_SHARE = 0.25
# Longest a training forward waits before one block for inference steps to finish.
_TRAINING_WAIT_S = 0.1

# The blocks [start, end) and the adapter id (None: no adapter) of the steps batched together.
BatchKey = tuple[int, int, str | None]


@dataclass
class _Queued:
    session_id: str
    cache: SpanKVCache
    hidden: torch.Tensor
    position: int
    lora: LoraWeights | None
    future: asyncio.Future[torch.Tensor]


@dataclass
class BatchStats:
    """What the batcher did: reported by the provider's ``info`` RPC."""

    steps: int = 0  # decode steps run through the batcher
    batches: int = 0  # forwards that ran them
    unbatched: int = 0  # steps that took the unbatched path (prefill, replay, batching off)
    sizes: Counter[int] = field(default_factory=Counter)  # batch size -> forwards of that size

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batches": self.batches,
            "unbatched": self.unbatched,
            "max_batch": max(self.sizes, default=0),
            "sizes": {str(size): count for size, count in sorted(self.sizes.items())},
        }


class StepBatcher:
    """Queues inference steps and runs the decode steps of sessions on the same blocks together."""

    def __init__(
        self,
        run: Callable[[Callable[[], Any], int], Awaitable[Any]],
        *,
        enabled: bool = True,
        max_sessions: int = 64,
        window_s: float = 0.001,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if window_s < 0:
            raise ValueError("window_s must not be negative")
        self._run = run  # the server's _run_compute (unbatched steps): inline when small, else its compute thread
        self.enabled, self.max_sessions, self.window_s = enabled, max_sessions, window_s
        self.stats = BatchStats()
        self._queues: dict[BatchKey, list[_Queued]] = {}
        self._timers: dict[BatchKey, asyncio.TimerHandle] = {}
        self._running: set[BatchKey] = set()  # blocks with a batched forward in flight
        self._last_forward_s: dict[BatchKey, float] = {}  # how long the last batched forward took
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_step: dict[str, tuple[BatchKey, float]] = {}
        # Batches run in a thread of their own, so that the event loop reads the next steps
        # meanwhile (they form the next batch), and never behind a training forward queued
        # in the server's compute thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemart-batch")
        self._busy = 0  # steps queued or being computed
        self._idle = threading.Event()  # set while _busy == 0 (training threads wait for it)
        self._idle.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- inference side (event loop thread) ------------------------------------------------

    async def step(
        self,
        backend: SpanBackend,
        session_id: str,
        cache: SpanKVCache,
        hidden: torch.Tensor,
        position: int,
        blocks: tuple[int, int],
        lora: LoraWeights | None = None,
        adapter_id: str | None = None,
    ) -> torch.Tensor:
        """The output of one session's step: batched with other sessions' decode steps on
        the same blocks with the same adapter (``adapter_id``, whose weights are ``lora``)
        when batching is on and this is a decode step, else on its own."""
        start, end = blocks
        span: BatchKey = (start, end, adapter_id if lora is not None else None)
        tokens = hidden.shape[0] * hidden.shape[1]
        self._enter()
        try:
            if not self.enabled or hidden.shape[1] != 1:
                self.stats.unbatched += 1
                output: torch.Tensor = await self._run(
                    lambda: backend.inference_step(cache, hidden, position, start, end, lora), tokens
                )
                return output
            now = time.monotonic()
            self._last_step[session_id] = (span, now)
            expected = self._expected(span, now)
            queue = self._queues.setdefault(span, [])
            if expected <= 1 and not queue and span not in self._running:
                # A lone session: its step at once, on the unbatched path (inline when small).
                self._count(1)
                alone: torch.Tensor = await self._run(
                    lambda: backend.inference_step(cache, hidden, position, start, end, lora), tokens
                )
                return alone
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            queue.append(_Queued(session_id, cache, hidden, position, lora, future))
            if span not in self._running:  # else taken when the forward in flight ends
                self._start_or_wait(backend, span, expected)
            return await future
        finally:
            self._leave()

    def forget(self, session_id: str) -> None:
        """A session closed: no queue waits for it any more."""
        self._last_step.pop(session_id, None)

    def _expected(self, span: BatchKey, now: float) -> int:
        """Sessions on ``span`` that stepped recently: how many steps a full queue holds."""
        return sum(1 for key, at in self._last_step.values() if key == span and now - at <= _ACTIVE_S)

    def _count(self, size: int) -> None:
        self.stats.steps += size
        self.stats.batches += 1
        self.stats.sizes[size] += 1

    def _start_or_wait(self, backend: SpanBackend, span: BatchKey, expected: int) -> None:
        """Start the queue's forward if every expected step is in it, else wait for the rest:
        for ``window_s``, or a quarter of the last forward on these blocks when that is longer
        (a forward costs about as much for a few sessions as for one, so a short wait that
        fills it serves more sessions for the same compute)."""
        if len(self._queues.get(span, ())) >= min(expected, self.max_sessions):
            self._start(backend, span)
        elif span not in self._timers:
            wait = max(self.window_s, _WAIT_SHARE * self._last_forward_s.get(span, 0.0))
            self._timers[span] = asyncio.get_running_loop().call_later(wait, self._window_over, backend, span)

    def _window_over(self, backend: SpanBackend, span: BatchKey) -> None:
        self._timers.pop(span, None)
        if self._queues.get(span) and span not in self._running:
            self._start(backend, span)

    def _start(self, backend: SpanBackend, span: BatchKey) -> None:
        """Take up to ``max_sessions`` queued steps on ``span`` into one forward, in its own
        task (so that a step whose stream goes away cannot cancel the others' forward)."""
        timer = self._timers.pop(span, None)
        if timer is not None:
            timer.cancel()
        queue = self._queues.pop(span, [])
        batch, rest = queue[: self.max_sessions], queue[self.max_sessions :]
        if rest:
            self._queues[span] = rest  # they go as soon as this forward ends
        self._running.add(span)
        task = asyncio.ensure_future(self._compute(backend, span, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compute(self, backend: SpanBackend, span: BatchKey, batch: list[_Queued]) -> None:
        steps = [(q.cache, q.hidden, q.position) for q in batch]
        # One adapter id, one adapter: its weights as the first step saw them (an owner who
        # replaces them mid-batch gets them from the next step on).
        lora = batch[0].lora
        self._count(len(batch))
        started = time.monotonic()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: backend.inference_steps(steps, span[0], span[1], lora)
            )
        except Exception as e:  # every session of the batch gets the error (the server reports it per session)
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(e)
        else:
            for q, output in zip(batch, outputs, strict=True):
                if not q.future.done():
                    q.future.set_result(output)
        finally:
            self._last_forward_s[span] = time.monotonic() - started
            self._running.discard(span)
            if self._queues.get(span):  # what queued meanwhile: at once when complete, else waits for the rest
                self._start_or_wait(backend, span, self._expected(span, time.monotonic()))

    def _enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    # --- training side (compute thread) ----------------------------------------------------

    def wait_for_inference(self) -> None:
        """Before a training forward's next block: let queued inference steps go first."""
        self._idle.wait(_TRAINING_WAIT_S)
