"""A Hugging Face-like causal LM whose transformer blocks run on the swarm.

The client keeps the embeddings, final norm and LM head; hidden states travel through a
chain of providers. ``model(input_ids)`` supports autograd (backward calls each provider's
``rpc_backward``); ``model.generate(...)`` runs a KV-cached inference session, with a
PEFT LoRA adapter applied on the providers when given ``adapter=``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from client_sdk.finetune.peft_export import read_peft_adapter
from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.remote import RemoteBlocks, RemoteLora
from client_sdk.swarm.routing import DEFAULT_HOP_COST_S, RouteHop, find_route
from client_sdk.swarm.session import ChainSession, SessionJob
from hivemart_core.errors import HivemartError, ModelError
from hivemart_core.models import ClientParts, ModelInfo, load_client_parts, load_config, load_model_info
from hivemart_core.models.lora import target_shapes
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["DistributedModelForCausalLM", "GenerationSession", "RemoteCache"]

# What ``adapter=`` takes: a PEFT LoRA directory, or an adapter loaded with ``model.load_adapter``.
AdapterLike = str | Path | RemoteLora


@dataclass
class GenerationSession:
    """An inference session kept open across ``generate`` calls (``with model.inference_session(...)``).

    ``tokens`` and ``mask`` are everything generated so far (with the attention mask of the
    first prompt): a later call continues from them. The chain holds the keys and values of
    all but the last token (chosen, not yet fed through the chain)."""

    chain: ChainSession
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    beams: bool = False  # a beam search ran: the cached rows follow its hypotheses, not ``tokens``

    @property
    def position(self) -> int:
        return self.chain.position

    @property
    def last_token(self) -> torch.Tensor | None:
        """The token chosen last and not yet fed through the chain (the next call feeds it first)."""
        return None if self.tokens is None else self.tokens[:, -1:]

    @last_token.setter
    def last_token(self, token: torch.Tensor) -> None:
        """After steps sent by hand (``session.chain.step``, e.g. a rollback), continue with
        ``token`` [batch, 1] after the chain's ``position`` tokens. Tokens the chain got by hand
        are unknown here: they show as the previous history (cut or padded with the pad token)
        to logits processors that look at the history (``repetition_penalty``)."""
        known = self.tokens if self.tokens is not None else token[:, :0]
        known = known[:, : self.position]
        if known.shape[1] < self.position:
            pad = known.new_zeros(known.shape[0], self.position - known.shape[1])
            known = torch.cat([known, pad], dim=1)
        self.tokens = torch.cat([known, token.to(known.dtype)], dim=1)
        mask = self.mask if self.mask is not None else torch.ones_like(known)
        kept = mask[:, : self.position]
        self.mask = torch.cat([kept, kept.new_ones(kept.shape[0], self.position + 1 - kept.shape[1])], dim=1)


class RemoteCache(Cache):
    """The ``past_key_values`` that ``transformers`` generation sees: the keys and values live
    in the providers' caches of an inference session; this object only knows their length
    and remembers a beam reorder, which the next step carries to every provider."""

    def __init__(self, session: GenerationSession) -> None:
        super().__init__(layers=[])
        self.session = session
        self.pending_reorder: torch.Tensor | None = None

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.session.position

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search keeps hypotheses ``beam_idx``: compose with a reorder not yet sent."""
        rows = beam_idx.cpu()
        self.pending_reorder = rows if self.pending_reorder is None else self.pending_reorder[rows]
        self.session.beams = True


class DistributedModelForCausalLM(GenerationMixin, torch.nn.Module):  # type: ignore[misc]
    """``DistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])``."""

    def __init__(
        self,
        info: ModelInfo,
        parts: ClientParts,
        runtime: SwarmRuntime,
        *,
        owns_runtime: bool,
        push: bool = True,
        hop_cost_s: float = DEFAULT_HOP_COST_S,
        config: PretrainedConfig | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> None:
        super().__init__()
        self.info, self.parts, self.runtime = info, parts, runtime
        # What transformers' GenerationMixin and users read, as on a local model.
        self.config = config if config is not None else PretrainedConfig()
        self.generation_config = (
            generation_config if generation_config is not None else GenerationConfig.from_model_config(self.config)
        )
        self._owns_runtime = owns_runtime
        self.push, self.hop_cost_s = push, hop_cost_s
        self.bans = PeerBans()  # shared by every session and call of this model
        # Autograd through the swarm (training, scoring): chunked batches with failover.
        self.remote = RemoteBlocks(runtime, self._find_route, info.num_blocks, bans=self.bans)
        # A paid job (client_sdk.swarm.job.SwarmJob.attach): its plan routes, its tickets pay.
        self.job: SessionJob | None = None
        for name, module in (("embed_tokens", parts.embed_tokens), ("norm", parts.norm), ("lm_head", parts.lm_head)):
            self.add_module(name, module)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        initial_peers: Sequence[str] = (),
        runtime: SwarmRuntime | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        push: bool = True,
    ) -> DistributedModelForCausalLM:
        """Load the client-side parts of the checkpoint at ``path`` (in ``dtype`` on
        ``device``) and connect to the swarm through ``runtime`` or ``initial_peers``."""
        info = load_model_info(path)
        parts = load_client_parts(path, dtype=dtype, device=device)
        config = load_config(path)
        try:  # eos, pad and sampling defaults from the checkpoint, as AutoModelForCausalLM reads them
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        owns = runtime is None
        runtime = runtime or SwarmRuntime(initial_peers)
        return cls(
            info,
            parts,
            runtime,
            owns_runtime=owns,
            push=push,
            config=config,
            generation_config=generation_config,
        )

    main_input_name = "input_ids"
    _is_stateful = False

    @property
    def device(self) -> torch.device:
        """Where inputs go (the client-side embeddings' device), as ``model.device`` on a local model."""
        return self.parts.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.embed_tokens.weight.dtype

    def can_generate(self) -> bool:
        return True

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.parts.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.parts.lm_head

    def close(self) -> None:
        if self._owns_runtime:
            self.runtime.shutdown()

    # --- routing -------------------------------------------------------------------------------

    async def _find_route(self, start: int, end: int, avoid: frozenset[str] = frozenset()) -> list[RouteHop]:
        """The fastest chain over blocks [start, end) among live, correctly signed records of
        free providers, avoiding peers that failed recently; with a job attached, the job's
        planned route."""
        if self.job is not None:
            return await self.job.find_route(start, end, avoid | self.bans.banned())
        records = await fetch_span_records(self.runtime.dht, self.info.model_id, range(start, end))
        return find_route(
            records.values(),
            self.info.model_id,
            start,
            end,
            hop_cost_s=self.hop_cost_s,
            avoid=avoid | self.bans.banned(),
            verified=self.bans.served(),
            free=True,
        )

    async def _route(self) -> list[RouteHop]:
        return await self._find_route(0, self.info.num_blocks)

    def route(self) -> list[RouteHop]:
        """The chain of providers a new session would use now."""
        return self.runtime.run(self._route())

    # --- training and scoring: autograd through remote blocks --------------------------------------

    @property
    def _client_dtype(self) -> torch.dtype:
        return self.parts.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RemoteCache | None = None,
        *,
        deep_prompts: torch.Tensor | None = None,
        lora: RemoteLora | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **generation_kwargs: Any,  # what generate passes models along (its tokenizer...): unused here
    ) -> torch.Tensor | CausalLMOutputWithPast:
        """Without ``past_key_values``: logits ``[batch, tokens, vocab]`` for ``input_ids`` (or
        for ``inputs_embeds``, the embeddings of the tokens), differentiable with respect to the client-side parameters (and the input embeddings)
        through the remote blocks, and to ``deep_prompts`` and ``lora.weights`` when given
        (see :meth:`run_blocks`).

        With a :class:`RemoteCache` (what :meth:`generate` passes): one step of its inference
        session, as ``transformers`` generation calls a local model; ``attention_mask`` covers
        the whole sequence so far, its last columns mark padding among the new tokens."""
        if past_key_values is not None:
            if input_ids is None:
                raise ValueError("a distributed generation step takes input_ids, not inputs_embeds")
            return self._session_step(input_ids, attention_mask, past_key_values, logits_to_keep)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        hidden = self.parts.embed(input_ids) if input_ids is not None else inputs_embeds
        assert hidden is not None  # one of the two was given
        hidden = self.run_blocks(hidden, deep_prompts=deep_prompts, lora=lora)
        return self.parts.logits(hidden.to(self._client_dtype))

    def _session_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: RemoteCache, logits_to_keep: int
    ) -> CausalLMOutputWithPast:
        tokens = input_ids.shape[1]
        mask = None if attention_mask is None else attention_mask[:, -tokens:].cpu()
        reorder, cache.pending_reorder = cache.pending_reorder, None
        hidden = self.runtime.run(cache.session.chain.step(self.parts.embed(input_ids), mask=mask, reorder=reorder))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits: Any = self.parts.logits(hidden.to(self._client_dtype))  # transformers types it FloatTensor
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def run_blocks(
        self, hidden: torch.Tensor, *, deep_prompts: torch.Tensor | None = None, lora: RemoteLora | None = None
    ) -> torch.Tensor:
        """Hidden states after all blocks, with autograd (backward calls ``rpc_backward``).

        ``deep_prompts`` ``[num_blocks, batch or 1, prefix, hidden]`` are added by each block
        to the first ``prefix`` positions of its input; ``lora`` is an adapter whose master
        weights this client holds. Large batches are split into chunks run concurrently, and
        failed providers are replaced (see :class:`client_sdk.swarm.remote.RemoteBlocks`).
        """
        return self.remote(hidden, deep_prompts, lora)

    # --- adapters ----------------------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterLike) -> RemoteLora:
        """A PEFT LoRA adapter of this model, ready for ``generate(adapter=...)``,
        ``inference_session(adapter=...)`` and ``model(input_ids, lora=...)``.

        ``adapter``: a directory holding ``adapter_config.json`` and
        ``adapter_model.safetensors`` (what ``hivemart finetune --out`` writes, or PEFT's
        ``save_pretrained``), or an adapter already loaded (checked against this model).
        Loading once and passing the result to every call uploads each provider's slice
        once (it is kept there while used, and re-uploaded if the provider forgot it); a
        directory passed to a call is uploaded for that call and deleted after it.
        Raises :class:`client_sdk.finetune.peft_export.AdapterFormatError` (a
        :class:`ModelError`) for a directory that is not a LoRA of this model.
        """
        shapes = target_shapes(self.config)
        if isinstance(adapter, RemoteLora):
            if adapter.num_blocks != self.info.num_blocks or any(
                adapter.shapes.get(t) != shapes[t] for t in adapter.spec.targets
            ):
                raise ModelError(
                    f"this adapter is for a model of {adapter.num_blocks} blocks with other layer shapes; "
                    f"{self.info.model_id} has {self.info.num_blocks} blocks"
                )
            return adapter
        if not isinstance(adapter, (str, Path)):
            raise TypeError(
                f"adapter must be a PEFT adapter directory or a loaded adapter, not {type(adapter).__name__}"
            )
        spec, weights = read_peft_adapter(adapter, shapes, self.info.num_blocks)
        return RemoteLora(spec, shapes, self.info.num_blocks, weights=weights)

    def release_adapter(self, adapter: RemoteLora) -> None:
        """Delete the copies of ``adapter`` the providers hold (unused ones also expire there)."""
        self.runtime.run(adapter.release(self.runtime.p2p))

    # --- generation --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def inference_session(
        self, max_length: int, batch_size: int = 1, *, adapter: AdapterLike | None = None
    ) -> Iterator[GenerationSession]:
        """Keep one KV-cached session open across several ``generate`` calls; with
        ``adapter`` (see :meth:`load_adapter`), every provider applies that LoRA adapter."""
        lora = None if adapter is None else self.load_adapter(adapter)
        owned = lora is not None and not isinstance(adapter, RemoteLora)  # loaded here: deleted here
        try:
            session = self.runtime.run(self._open_chain(max_length, batch_size, lora))
            try:
                yield GenerationSession(session)
            finally:
                self.runtime.run(session.close())
        finally:
            if owned:
                assert lora is not None
                self.release_adapter(lora)

    async def _open_chain(self, max_length: int, batch_size: int, adapter: RemoteLora | None = None) -> ChainSession:
        chain = ChainSession(
            self.runtime.p2p,
            await self._route(),
            max_length=max_length,
            batch_size=batch_size,
            push=self.push,
            find_route=self._find_route,
            bans=self.bans,
            job=self.job,
            adapter=adapter,
        )
        await chain.open()
        return chain

    def generate(  # type: ignore[override]
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *args: Any,
        session: GenerationSession | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        adapter: AdapterLike | None = None,
        **kwargs: Any,
    ) -> Any:
        """``transformers``' ``generate``, with the transformer blocks on the swarm.

        Takes what a local model's ``generate`` takes (``**tokenizer(texts, padding=True,
        return_tensors="pt")``, greedy, sampling, beam search, logits processors, stopping
        criteria, streamers, ``return_dict_in_generate``...) and returns what it returns: the
        prompt followed by the new tokens. Defaults come from ``model.generation_config``
        (the checkpoint's ``generation_config.json``).

        Within a ``session`` (``with model.inference_session(...)``), a later call continues
        where the previous one stopped; ``inputs`` then holds only the new text to append (or
        None), and the call returns that text followed by its new tokens. ``generator`` seeds
        sampling (else torch's global generator is used, as locally); ``on_token`` is called
        with each new token column [batch] as soon as it is chosen. ``adapter``: a PEFT LoRA
        directory or loaded adapter (:meth:`load_adapter`) that the providers apply, so that
        the result is what the base model with ``peft.PeftModel`` computes locally (within a
        session, give it to :meth:`inference_session` instead).
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is not None and (inputs.ndim != 2 or inputs.shape[1] == 0):
            raise ValueError("input_ids must have shape [batch, tokens] with at least one token")
        if session is not None and adapter is not None:
            raise ValueError("a session's adapter is chosen when opening it: inference_session(..., adapter=...)")
        if session is None:
            if inputs is None:
                raise ValueError("input_ids is required outside of an inference session")
            config = self._resolved_config(generation_config, kwargs)
            final = inputs.shape[1] + self._new_tokens(config, inputs.shape[1])
            rows = inputs.shape[0] * (config.num_beams if config.num_beams > 1 else config.num_return_sequences)
            with self.inference_session(max(final, inputs.shape[1] + 1), rows, adapter=adapter) as fresh:
                return self.generate(
                    inputs, generation_config, *args, session=fresh, generator=generator, on_token=on_token, **kwargs
                )
        if session.beams:
            raise HivemartError("a beam search ran in this session; open a new session to generate more")
        history = session.tokens
        if inputs is None and history is None:
            raise ValueError("nothing to continue from: pass input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if inputs is not None and attention_mask is not None and attention_mask.shape != inputs.shape:
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; input_ids {list(inputs.shape)}")
        pieces = [t for t in (history, inputs) if t is not None]
        full = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        if history is not None or attention_mask is not None:
            own = torch.ones_like(inputs) if inputs is not None and attention_mask is None else attention_mask
            masks = [m for m in (session.mask if history is not None else None, own) if m is not None]
            attention_mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
            kwargs["attention_mask"] = attention_mask
        config = self._resolved_config(generation_config, kwargs)
        multiple = config.num_beams if config.num_beams > 1 else config.num_return_sequences
        if full.shape[0] * multiple != session.chain.batch_size:
            raise ValueError(
                f"{full.shape[0]} sequences x {multiple} (beams or return sequences) do not fill the session's "
                f"batch of {session.chain.batch_size}; open it with batch_size={full.shape[0] * multiple}"
            )
        needed = full.shape[1] + self._new_tokens(config, full.shape[1]) - 1
        if needed > session.chain.max_length:
            raise HivemartError(
                f"this generation needs {needed} positions but the session holds at most "
                f"{session.chain.max_length}; open it with a larger max_length"
            )
        if on_token is not None:
            kwargs["streamer"] = _CallbackStreamer(on_token, kwargs.get("streamer"))
        with _seeded(generator):
            result = GenerationMixin.generate(
                self, full, generation_config, *args, past_key_values=RemoteCache(session), **kwargs
            )
        sequences = result if isinstance(result, torch.Tensor) else result.sequences
        session.tokens = sequences
        if attention_mask is None:
            attention_mask = torch.ones_like(full)
        session.mask = (
            torch.cat(
                [attention_mask, attention_mask.new_ones(sequences.shape[0], sequences.shape[1] - full.shape[1])], dim=1
            )
            if sequences.shape[0] == attention_mask.shape[0]
            else None
        )
        if history is None:
            return result
        if isinstance(result, torch.Tensor):
            return result[:, history.shape[1] :]
        result.sequences = sequences[:, history.shape[1] :]  # type: ignore[assignment]
        return result

    def _resolved_config(self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
        """The generation config a call will use (its base updated with the call's keywords)."""
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(
                f"generate's second argument is a GenerationConfig, as on a local model, not "
                f"{type(generation_config).__name__}; pass lengths by name: generate(ids, max_new_tokens=20)"
            )
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        return config

    @staticmethod
    def _new_tokens(config: GenerationConfig, prompt: int) -> int:
        if config.max_new_tokens is not None:
            if config.max_new_tokens < 0:
                raise ValueError("max_new_tokens must be >= 0")
            return int(config.max_new_tokens)
        return max(int(config.max_length) - prompt, 0)


class _CallbackStreamer(BaseStreamer):  # type: ignore[misc]
    """Calls ``on_token`` with each new token column (generation's first ``put`` is the prompt)."""

    def __init__(self, on_token: Callable[[torch.Tensor], None], inner: BaseStreamer | None) -> None:
        self.on_token, self.inner, self.prompt_seen = on_token, inner, False

    def put(self, value: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.put(value)
        if self.prompt_seen:
            self.on_token(value.reshape(-1))
        self.prompt_seen = True

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Sample from ``generator``'s state (and advance it), leaving torch's global generator as it was."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(torch.get_rng_state())
