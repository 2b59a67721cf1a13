"""Runs a span of transformer blocks: inference with a KV cache, forward, and backward.

The blocks are the real ``transformers`` decoder layers loaded by ``hivemart_core.models``, so
a span computes exactly what the same layers compute inside ``AutoModelForCausalLM``.
Forward and backward also take what fine-tuning jobs send: *deep prompts* (a tensor
``[blocks, batch or 1, prefix, hidden]`` added to the first ``prefix`` positions of each
block's input, as Petals does) and a LoRA adapter (see :mod:`hivemart_core.models.adapters`);
backward returns the gradients with respect to both along with the input gradient.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hivemart_core.models import ModelInfo, load_blocks, load_config, load_model_info, make_rotary_embedding
from hivemart_core.models.adapters import ActiveLora, active_lora, adaptable_copies
from hivemart_core.models.lora import TARGET_MODULES, LoraSpec, target_shapes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["SpanBackend", "SpanKVCache", "BatchedKVCache", "LoraWeights", "SpanGrads", "KeptGraph", "KeptGraphs"]


@dataclass(frozen=True)
class LoraWeights:
    """An adapter's weights for the blocks of one request: ``weights[i]`` is block ``start + i``."""

    spec: LoraSpec
    weights: torch.Tensor  # [blocks, per_block]
    start: int
    source: torch.Tensor | None = None  # the adapter's whole weights tensor (replaced, never changed in place)


@dataclass(frozen=True)
class SpanGrads:
    """What a backward returns: gradients with respect to the inputs, deep prompts and adapter."""

    inputs: torch.Tensor
    prompts: torch.Tensor | None = None
    adapter: torch.Tensor | None = None  # float32, shaped like LoraWeights.weights


@dataclass
class KeptGraph:
    """The autograd graph of one forward, kept so that its backward need not recompute it."""

    start: int
    end: int
    inputs: torch.Tensor  # leaf
    prompts: torch.Tensor | None  # leaf
    weights: torch.Tensor | None  # the adapter rows (a leaf when lora_grads)
    lora_grads: bool
    outputs: torch.Tensor
    nbytes: int  # activation memory the graph holds (estimated from its saved tensors)
    adapter_tensor: torch.Tensor | None = None  # the adapter's weights object at forward time
    created: float = 0.0

    def matches(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        prompts: torch.Tensor | None,
        adapter_tensor: torch.Tensor | None,
        lora_grads: bool,
    ) -> bool:
        """Whether a backward request is for exactly this forward (else it recomputes)."""

        def same(kept: torch.Tensor, sent: torch.Tensor) -> bool:
            return kept.shape == sent.shape and torch.equal(kept.detach(), sent.to(kept.device, kept.dtype))

        return (
            (self.start, self.end, self.lora_grads) == (start, end, lora_grads)
            and self.adapter_tensor is adapter_tensor
            and same(self.inputs, hidden)
            and (prompts is None) == (self.prompts is None)
            and (prompts is None or self.prompts is None or same(self.prompts, prompts))
        )


class KeptGraphs:
    """Graphs kept between a forward and its backward, per owner and graph id, within a byte
    budget (oldest dropped first) and for at most ``ttl`` seconds. A dropped graph only costs
    its backward a recomputation."""

    def __init__(self, *, budget_bytes: int, ttl: float) -> None:
        self.budget_bytes, self.ttl = budget_bytes, ttl
        self._graphs: OrderedDict[tuple[str, str], KeptGraph] = OrderedDict()
        self.used_bytes = 0
        # Forwards computed on the compute thread keep their graphs from there.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def put(self, owner: str, graph_id: str, graph: KeptGraph) -> bool:
        """Keep ``graph`` (dropping the oldest ones to make room); False if it alone is too large."""
        if graph.nbytes > self.budget_bytes:
            return False
        with self._lock:
            self._pop((owner, graph_id))
            while self.used_bytes + graph.nbytes > self.budget_bytes:
                self._pop(next(iter(self._graphs)))
            graph.created = time.monotonic()
            self._graphs[(owner, graph_id)] = graph
            self.used_bytes += graph.nbytes
        return True

    def _pop(self, key: tuple[str, str]) -> KeptGraph | None:
        graph = self._graphs.pop(key, None)
        if graph is not None:
            self.used_bytes -= graph.nbytes
        return graph

    def pop(self, owner: str, graph_id: str) -> KeptGraph | None:
        """Take the graph out (a graph serves one backward)."""
        with self._lock:
            return self._pop((owner, graph_id))

    def expire(self, now: float | None = None) -> int:
        deadline = (time.monotonic() if now is None else now) - self.ttl
        with self._lock:
            stale = [key for key, graph in self._graphs.items() if graph.created < deadline]
            for key in stale:
                self._pop(key)
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self.used_bytes = 0


class SpanKVCache:
    """Keys and values of one inference session for the blocks of one span.

    Implements the part of ``transformers.Cache`` that decoder layers call (``update``).
    Buffers are allocated once for ``max_length`` tokens, so a step never copies the whole
    history, memory is known when the session opens, and rolling back to an earlier
    position only moves a length.
    """

    def __init__(
        self,
        *,
        first_layer: int,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.first_layer = first_layer
        self.max_length = max_length
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens whose keys and values are stored
        # [batch, max_length], True = a real token; None while no step sent padding (all real).
        self.mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def prepare_step(
        self, position: int, tokens: int, mask: torch.Tensor | None = None, reorder: torch.Tensor | None = None
    ) -> None:
        """Before a step of ``tokens`` at ``position``: keep only the cached rows ``reorder``
        (beam search continues those hypotheses), then note which new tokens are padding
        (``mask`` [batch, tokens], True = real). Callers check the shapes and indices."""
        if reorder is not None and position > 0:
            index = reorder.to(self.keys[0].device)
            for cached in (*self.keys, *self.values):
                cached[:, :, :position] = cached[:, :, :position].index_select(0, index)
            if self.mask is not None:
                self.mask[:, :position] = self.mask[:, :position].index_select(0, index.to(self.mask.device))
        if mask is not None and self.mask is None and not bool(mask.all()):
            self.mask = torch.ones(self.batch_size, self.max_length, dtype=torch.bool, device=self.keys[0].device)
        if self.mask is not None:
            self.mask[:, position : position + tokens] = True if mask is None else mask.to(self.mask.device)

    @staticmethod
    def bytes_needed(
        *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * batch_size * num_kv_heads * max_length * head_dim * dtype.itemsize

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.length
        end = start + key_states.shape[-2]
        index = layer_idx - self.first_layer
        self.keys[index][:, :, start:end] = key_states
        self.values[index][:, :, start:end] = value_states
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class BatchedKVCache:
    """The caches of several sessions seen by the decoder layers as one batch, for one step of
    one token per session (:meth:`SpanBackend.inference_steps`).

    Row group ``i`` (``rows[i]`` rows: the session's own batch) is at ``positions[i]``. Each
    ``update`` writes every session's new key and value into its own :class:`SpanKVCache`
    (so the session goes on alone or in any other batch afterwards), then returns all
    sessions' keys and values padded with zeros to the longest; the attention mask hides
    the padding from each row.
    """

    def __init__(self, caches: Sequence[SpanKVCache], rows: Sequence[int], positions: Sequence[int]) -> None:
        firsts = {cache.first_layer for cache in caches}
        if len(firsts) != 1:
            raise ValueError("a batched step needs sessions over the same blocks")
        self.first_layer = firsts.pop()
        self.caches, self.rows, self.positions = list(caches), list(rows), list(positions)
        self.total = max(self.positions) + 1

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = layer_idx - self.first_layer
        batch, heads, _, head_dim = key_states.shape
        # Zeros, not empty memory: a masked score is still computed, and NaN garbage times 0 is NaN.
        keys = key_states.new_zeros(batch, heads, self.total, head_dim)
        values = value_states.new_zeros(batch, heads, self.total, head_dim)
        row = 0
        for cache, count, position in zip(self.caches, self.rows, self.positions, strict=True):
            own_keys, own_values = cache.keys[index], cache.values[index]
            own_keys[:, :, position : position + 1] = key_states[row : row + count]
            own_values[:, :, position : position + 1] = value_states[row : row + count]
            keys[row : row + count, :, : position + 1] = own_keys[:, :, : position + 1]
            values[row : row + count, :, : position + 1] = own_values[:, :, : position + 1]
            row += count
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total - 1


def _count_storage(storages: dict[int, int], tensor: torch.Tensor, excluded: set[int]) -> None:
    """Record the storage behind ``tensor`` (once per storage) unless it is in ``excluded``."""
    storage = tensor.untyped_storage()
    if storage.data_ptr() not in excluded:
        storages[storage.data_ptr()] = storage.nbytes()


def _padded_positions_and_mask(real: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and attention mask of the tokens after ``position`` in rows where
    ``real`` [batch, total] marks padding (False), exactly as ``transformers`` builds them
    from an ``attention_mask``: positions count real tokens only (padding gets 1), and a
    token attends to earlier real tokens and itself."""
    position_ids = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)[:, position:]
    total = real.shape[1]
    causal = torch.ones(total - position, total, dtype=torch.bool, device=real.device).tril(diagonal=position)
    return position_ids, causal[None, None] & real[:, None, None, :]


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _nothing() -> None:
    return None


class SpanBackend:
    """Blocks ``[start, end)`` of one model on one device, ready to run."""

    def __init__(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.info: ModelInfo = load_model_info(model_path)
        if not 0 <= start < end <= self.info.num_blocks:
            raise ValueError(f"blocks {start}:{end} are outside the model's 0:{self.info.num_blocks}")
        self.start, self.end = start, end
        self.device = torch.device(device)
        self.layers = load_blocks(model_path, start, end, dtype=dtype, device=self.device)
        self.dtype: torch.dtype = next(self.layers[0].parameters()).dtype
        self.lora_shapes = target_shapes(load_config(model_path))
        self.adaptable_layers = adaptable_copies(self.layers, start, list(TARGET_MODULES))
        self._weight_storages = {p.untyped_storage().data_ptr() for layer in self.layers for p in layer.parameters()}
        attention: Any = self.layers[0].self_attn  # transformers' attention; torch types it Tensor | Module
        config: PretrainedConfig = attention.config
        self.rotary = make_rotary_embedding(config, device=self.device)
        self._rope_table = self._build_rope_table(config)
        # Called before each block of a run without a cache (forwards and the forward of a
        # backward): a provider makes training wait there while inference steps are due.
        self.between_layers: Callable[[], None] = _nothing

    def _build_rope_table(self, config: object, max_positions: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin for every position, computed once by the model's own rotary module.

        Rotary embeddings cost about 0.1 ms per step on a CPU, which is a tenth of a small
        span's whole step. Each table entry is an elementwise product computed exactly as
        the module computes it per step, so lookups give identical values. Dynamic rope
        scaling depends on the sequence length and is computed per step instead.
        """
        if "dynamic" in str(getattr(self.rotary, "rope_type", "default")):
            return None
        limit = min(max_positions, int(getattr(config, "max_position_embeddings", max_positions)))
        with torch.inference_mode():
            probe = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = self.rotary(probe, torch.arange(limit, device=self.device)[None])
        return cos[0], sin[0]

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._rope_table
        if table is None or int(position_ids.max()) >= table[0].shape[0]:
            cos_sin: tuple[torch.Tensor, torch.Tensor] = self.rotary(hidden, position_ids)
            return cos_sin
        return table[0][position_ids].to(hidden.dtype), table[1][position_ids].to(hidden.dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes of weights in one block (the first; a model's blocks are alike)."""
        return sum(p.nbytes for p in self.layers[0].parameters())

    # --- helpers -------------------------------------------------------------------------

    def layers_for(self, start: int, end: int, *, adaptable: bool = False) -> list[torch.nn.Module]:
        """Blocks ``[start, end)``; with ``adaptable``, the copies that apply the active adapter."""
        layers = self.adaptable_layers if adaptable else self.layers
        return layers[start - self.start : end - self.start]

    def cache_bytes(self, *, num_layers: int, batch_size: int, max_length: int) -> int:
        return SpanKVCache.bytes_needed(
            num_layers=num_layers,
            batch_size=batch_size,
            max_length=max_length,
            num_kv_heads=self.info.num_kv_heads,
            head_dim=self.info.head_dim,
            dtype=self.dtype,
        )

    def new_cache(self, *, start: int, end: int, batch_size: int, max_length: int) -> SpanKVCache:
        return SpanKVCache(
            first_layer=start,
            num_layers=end - start,
            batch_size=batch_size,
            max_length=max_length,
            num_kv_heads=self.info.num_kv_heads,
            head_dim=self.info.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def _run(
        self,
        layers: list[torch.nn.Module],
        hidden: torch.Tensor,
        position: int,
        cache: SpanKVCache | None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq_len = hidden.shape[1]
        cache_position = torch.arange(position, position + seq_len, device=self.device)
        position_ids = cache_position.unsqueeze(0).expand(hidden.shape[0], -1)
        mask = None
        if cache is not None and cache.mask is not None:
            position_ids, mask = _padded_positions_and_mask(cache.mask[:, : position + seq_len], position)
        elif seq_len > 1 and position > 0:
            # A chunk after cached tokens: sdpa's is_causal would align the triangle top-left,
            # so spell the causal mask out (True = may attend).
            total = position + seq_len
            mask = torch.ones(seq_len, total, dtype=torch.bool, device=self.device).tril(diagonal=position)[None, None]
        return self._run_layers(layers, hidden, position_ids, cache_position, mask, cache, prompts)

    def _run_layers(
        self,
        layers: list[torch.nn.Module],
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: SpanKVCache | BatchedKVCache | None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        position_embeddings = self.position_embeddings(hidden, position_ids)
        for index, layer in enumerate(layers):
            if cache is None:
                self.between_layers()
            if prompts is not None:
                prefix = prompts.shape[2]
                hidden = torch.cat([hidden[:, :prefix] + prompts[index], hidden[:, prefix:]], dim=1)
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                cache_position=cache_position,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _active(self, lora: LoraWeights | None, weights: torch.Tensor | None = None) -> ActiveLora | None:
        if lora is None:
            return None
        return ActiveLora(lora.spec, self.lora_shapes, lora.weights if weights is None else weights, lora.start)

    # --- the three kinds of work -----------------------------------------------------------

    @torch.inference_mode()
    def inference_step(
        self,
        cache: SpanKVCache,
        hidden: torch.Tensor,
        position: int,
        start: int,
        end: int,
        lora: LoraWeights | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` (positions ``position..``) through blocks ``[start, end)`` (with the
        ``lora`` adapter if given) and append its keys and values to ``cache``, first
        dropping anything at or after ``position`` (a rollback)."""
        cache.length = position
        with active_lora(self._active(lora)):
            output = self._run(
                self.layers_for(start, end, adaptable=lora is not None),
                hidden.to(self.device, self.dtype),
                position,
                cache,
            )
        cache.length = position + hidden.shape[1]
        return output

    @torch.inference_mode()
    def inference_steps(
        self,
        steps: Sequence[tuple[SpanKVCache, torch.Tensor, int]],
        start: int,
        end: int,
        lora: LoraWeights | None = None,
    ) -> list[torch.Tensor]:
        """Decode steps of several sessions over blocks ``[start, end)`` as one batched forward.

        ``steps``: (the session's cache, its hidden states ``[batch, 1, hidden]``, its position)
        per session, each session at most once. Each session may be at its own position
        (and rolls back to it, as in :meth:`inference_step`); its rows attend only to its
        own cache. ``lora``: the adapter every session of the batch applies (sessions with
        different adapters, or with and without one, go in different batches). Returns each
        session's output, in order. One step alone takes :meth:`inference_step`'s path unchanged. Results equal the unbatched ones up to
        float rounding (a batched matrix product may sum in another order).
        """
        if len(steps) == 1:
            cache, hidden, position = steps[0]
            return [self.inference_step(cache, hidden, position, start, end, lora)]
        if len({id(cache) for cache, _, _ in steps}) != len(steps):
            raise ValueError("a session can have only one step in a batch")
        hiddens = [hidden.to(self.device, self.dtype) for _, hidden, _ in steps]
        if any(h.ndim != 3 or h.shape[1] != 1 for h in hiddens):
            raise ValueError("a batched step takes one token per session: hidden states [batch, 1, hidden]")
        rows = [h.shape[0] for h in hiddens]
        positions = [position for _, _, position in steps]
        for (cache, _, position), count in zip(steps, rows, strict=True):  # all checked before any cache changes
            if not 0 <= position <= cache.length or position + 1 > cache.max_length or cache.keys[0].shape[0] != count:
                raise ValueError(f"a step at position {position} of batch {count} does not fit its cache")
            if cache.first_layer != start:
                raise ValueError("a batched step needs sessions over the same blocks")
        for cache, _, position in steps:
            cache.length = position  # a rollback, as in inference_step
        row_positions = torch.tensor(
            [p for p, count in zip(positions, rows, strict=True) for _ in range(count)], device=self.device
        )
        batched = BatchedKVCache([cache for cache, _, _ in steps], rows, positions)
        # Row r may attend to its own session's positions 0..position_r only (True = may attend).
        mask = torch.arange(batched.total, device=self.device)[None] <= row_positions[:, None]
        position_ids = row_positions[:, None].clone()
        row = 0
        for (cache, _, position), count in zip(steps, rows, strict=True):
            if cache.mask is not None:  # a padded session: its own padding is hidden, positions skip it
                ids, own = _padded_positions_and_mask(cache.mask[:, : position + 1], position)
                position_ids[row : row + count] = ids
                mask[row : row + count, : position + 1] = own[:, 0, 0]
            row += count
        with active_lora(self._active(lora)):
            output = self._run_layers(
                self.layers_for(start, end, adaptable=lora is not None),
                torch.cat(hiddens),
                position_ids,
                None,
                mask[:, None, None, :],
                batched,
            )
        for cache, _, position in steps:
            cache.length = position + 1
        return list(output.split(rows))

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        *,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> torch.Tensor:
        """Outputs of blocks ``[start, end)`` for full sequences, without a cache, with the
        deep ``prompts`` of those blocks and the ``lora`` adapter if given."""
        prompts = None if prompts is None else prompts.to(self.device, self.dtype)
        with active_lora(self._active(lora)):
            return self._run(
                self.layers_for(start, end, adaptable=lora is not None),
                hidden.to(self.device, self.dtype),
                0,
                None,
                prompts,
            )

    def graph(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        *,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
        lora_grads: bool = False,
    ) -> KeptGraph:
        """The forward of blocks ``[start, end)`` with autograd on, ready for :meth:`grads`.

        Its ``nbytes`` is the memory the graph keeps alive: every distinct storage its saved
        tensors, inputs and outputs hold (a view keeps its whole storage), weights excluded.
        """
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            _count_storage(storages, tensor, self._weight_storages)
            # Never return the tensor itself: when it is an output of the node saving it, it
            # holds that node (grad_fn), which holds it back, a cycle in C++ that Python's
            # collector cannot see, so a graph whose backward never ran leaked all its
            # activations. A detached alias shares the storage without the grad_fn.
            return tensor.detach()

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            inputs = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            prompt_leaf = weights = None
            if prompts is not None:
                prompt_leaf = prompts.to(self.device, self.dtype).detach().requires_grad_(True)
            if lora is not None:
                weights = lora.weights.detach().requires_grad_(lora_grads)
            with active_lora(self._active(lora, weights)):
                outputs = self._run(
                    self.layers_for(start, end, adaptable=lora is not None), inputs, 0, None, prompt_leaf
                )
        for tensor in (inputs, prompt_leaf, outputs):
            if tensor is not None:
                _count_storage(storages, tensor, self._weight_storages)
        return KeptGraph(
            start, end, inputs, prompt_leaf, weights, lora is not None and lora_grads, outputs, sum(storages.values())
        )

    @staticmethod
    def grads(graph: KeptGraph, grad_output: torch.Tensor) -> SpanGrads:
        """Backpropagate ``grad_output`` through a graph (which cannot be used again)."""
        leaves = [graph.inputs] + [t for t in (graph.prompts,) if t is not None]
        if graph.lora_grads and graph.weights is not None:  # lora_grads implies weights
            leaves.append(graph.weights)
        grads = torch.autograd.grad(graph.outputs, leaves, grad_output.to(graph.outputs.device, graph.outputs.dtype))
        grad_prompts = grads[1] if graph.prompts is not None else None
        grad_lora = grads[-1].float() if graph.lora_grads else None
        return SpanGrads(grads[0], grad_prompts, grad_lora)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        *,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
        lora_grads: bool = False,
    ) -> SpanGrads:
        """Gradients of ``sum(outputs * grad_output)`` with respect to the inputs of blocks
        ``[start, end)``, their deep ``prompts`` (if given) and the ``lora`` weights (if
        ``lora_grads``): recomputes the forward with autograd on, then backpropagates."""
        return self.grads(
            self.graph(hidden, start, end, prompts=prompts, lora=lora, lora_grads=lora_grads), grad_output
        )
