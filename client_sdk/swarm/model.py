"""A Hugging Face-like causal LM whose transformer blocks run on the swarm.

The client keeps the embeddings, final norm and LM head; hidden states travel through a
chain of providers. ``model(input_ids)`` supports autograd (backward calls each provider's
``rpc_backward``); ``model.generate(...)`` runs a KV-cached inference session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from client_sdk.swarm.bans import PeerBans
from client_sdk.swarm.remote import RemoteBlocks, RemoteLora
from client_sdk.swarm.routing import DEFAULT_HOP_COST_S, RouteHop, find_route
from client_sdk.swarm.session import ChainSession, SessionJob
from hivemart_core.errors import HivemartError
from hivemart_core.models import ClientParts, ModelInfo, load_client_parts, load_model_info
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.runtime import SwarmRuntime

__all__ = ["DistributedModelForCausalLM", "GenerationSession"]


@dataclass
class GenerationSession:
    """An inference session kept open across ``generate`` calls (``with model.inference_session(...)``)."""

    chain: ChainSession
    last_token: torch.Tensor | None = None  # sampled but not yet fed through the chain

    @property
    def position(self) -> int:
        return self.chain.position


class DistributedModelForCausalLM(torch.nn.Module):
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
    ) -> None:
        super().__init__()
        self.info, self.parts, self.runtime = info, parts, runtime
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
        owns = runtime is None
        runtime = runtime or SwarmRuntime(initial_peers)
        return cls(info, parts, runtime, owns_runtime=owns, push=push)

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
        self, input_ids: torch.Tensor, *, deep_prompts: torch.Tensor | None = None, lora: RemoteLora | None = None
    ) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` for ``input_ids``; differentiable with respect to
        the client-side parameters (and the input embeddings) through the remote blocks, and
        to ``deep_prompts`` and ``lora.weights`` when given (see :meth:`run_blocks`)."""
        hidden = self.parts.embed(input_ids)
        hidden = self.run_blocks(hidden, deep_prompts=deep_prompts, lora=lora)
        return self.parts.logits(hidden.to(self._client_dtype))

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

    # --- generation --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[GenerationSession]:
        """Keep one KV-cached session open across several ``generate`` calls."""
        session = self.runtime.run(self._open_chain(max_length, batch_size))
        try:
            yield GenerationSession(session)
        finally:
            self.runtime.run(session.close())

    async def _open_chain(self, max_length: int, batch_size: int) -> ChainSession:
        chain = ChainSession(
            self.runtime.p2p,
            await self._route(),
            max_length=max_length,
            batch_size=batch_size,
            push=self.push,
            find_route=self._find_route,
            bans=self.bans,
            job=self.job,
        )
        await chain.open()
        return chain

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        session: GenerationSession | None = None,
        eos_token_id: int | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` after ``input_ids`` [batch, tokens].

        Returns the prompt followed by the new tokens, like ``transformers``. Within a
        ``session``, a later call continues where the previous one stopped; ``input_ids``
        then holds only the new text to append (or None). ``on_token`` is called with each
        new token column [batch] as soon as it is chosen (to stream text to a terminal).
        """
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if input_ids is not None and (input_ids.ndim != 2 or input_ids.shape[1] == 0):
            raise ValueError("input_ids must have shape [batch, tokens] with at least one token")
        if session is None:
            if input_ids is None:
                raise ValueError("input_ids is required outside of an inference session")
            with self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0]) as fresh:
                return self.generate(
                    input_ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                    session=fresh,
                    eos_token_id=eos_token_id,
                    on_token=on_token,
                )
        sampler = _Sampler(do_sample, temperature, top_k, top_p, generator)
        return self.runtime.run(self._generate(session, input_ids, max_new_tokens, sampler, eos_token_id, on_token))

    async def _generate(
        self,
        session: GenerationSession,
        input_ids: torch.Tensor | None,
        max_new_tokens: int,
        sampler: _Sampler,
        eos_token_id: int | None,
        on_token: Callable[[torch.Tensor], None] | None,
    ) -> torch.Tensor:
        pending = [t for t in (session.last_token, input_ids) if t is not None]
        if not pending:
            raise ValueError("nothing to continue from: pass input_ids")
        feed = torch.cat(pending, dim=1)
        needed = session.position + feed.shape[1] + max_new_tokens - 1
        if needed > session.chain.max_length:
            raise HivemartError(
                f"this generation needs {needed} positions but the session holds at most "
                f"{session.chain.max_length}; open it with a larger max_length"
            )
        outputs = [input_ids] if input_ids is not None else []
        finished = torch.zeros(feed.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            hidden = await session.chain.step(self.parts.embed(feed))
            logits = self.parts.logits(hidden[:, -1:].to(self._client_dtype))[:, -1]
            token = sampler(logits).cpu()
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            outputs.append(token[:, None])
            if on_token is not None:
                on_token(token)
            feed = token[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        session.last_token = feed if max_new_tokens > 0 else session.last_token
        return torch.cat(outputs, dim=1)


class _Sampler:
    """Greedy or temperature / top-k / top-p sampling of the next token."""

    def __init__(
        self,
        do_sample: bool,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be >= 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float().cpu() / self.temperature  # sample on the CPU, where ``generator`` lives
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > self.top_p  # keep the token that crosses top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]
