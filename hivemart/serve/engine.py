"""One request's generation through the swarm: the prompt's tokens, the SDK's generation
(free, or billed to a marketplace job of the caller's key), each choice's text as it streams
(stop strings, end of sequence, ``max_tokens``) and the token counts of ``usage``.

The gateway calls the SDK only through :func:`sdk_generate`, the SDK's public generation API
(``model.generate`` with ``on_token``); generation runs in a worker thread, since the SDK
blocks until its swarm loop answers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivemart.serve.errors import OpenAIError, bad_request
from hivemart.serve.requests import GenerationRequest

if TYPE_CHECKING:
    import torch

    from client_sdk.swarm.job import MarketJob
    from client_sdk.swarm.model import DistributedModelForCausalLM
    from client_sdk.swarm.remote import RemoteLora
    from hivemart_core.api import Client

__all__ = ["Served", "MarketPayer", "Choices", "Generation", "sdk_generate", "ADAPTER_NAME"]

logger = logging.getLogger(__name__)

# An adapter's name, served as model "<model>:<name>": plain characters, so that it is one URL
# path segment and reads the same in every client.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

Delta = tuple[int, str, str | None]  # (choice index, new text, finish reason once it finished)


class _Stop(Exception):
    """Raised from ``on_token`` to end a generation early: every choice finished, or the client left."""


def sdk_generate(
    model: DistributedModelForCausalLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    eos_token_id: int | None,
    on_token: Callable[[torch.Tensor], None],
    adapter: RemoteLora | None = None,
) -> None:
    """The gateway's one call into the SDK's generation API: greedy at temperature 0 (as
    OpenAI's models approximately are), else sampling, seeded when ``seed`` is given; with a
    loaded ``adapter``, the providers apply that PEFT LoRA."""
    import torch

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p if top_p < 1 else None,
        generator=generator,
        eos_token_id=eos_token_id,
        on_token=on_token,
        adapter=adapter,
    )


@dataclass
class Served:
    """The model the gateway serves: the SDK's client half (shared by every request), its
    tokenizer and its context length; ``adapters`` are the PEFT LoRAs served as models
    ``"<name>:<adapter>"``, each loaded once and shared by every request."""

    name: str
    model: DistributedModelForCausalLM
    tokenizer: Any
    context: int
    adapters: dict[str, RemoteLora] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, *, initial_peers: list[str], name: str | None = None) -> Served:
        from client_sdk.swarm.model import DistributedModelForCausalLM

        return cls.for_model(DistributedModelForCausalLM.from_pretrained(path, initial_peers=initial_peers), name=name)

    @classmethod
    def for_model(cls, model: DistributedModelForCausalLM, *, name: str | None = None) -> Served:
        """Serve an open ``model`` (its checkpoint's tokenizer and context length)."""
        from hivemart_core.models import load_tokenizer

        tokenizer = load_tokenizer(model.info.path)
        return cls(name or model.info.model_id, model, tokenizer, _context_length(model.info.path, tokenizer))

    def add_adapter(self, name: str, directory: Path) -> None:
        """Serve the PEFT LoRA in ``directory`` as model ``"<name>:<adapter name>"``; raises
        ValueError for a bad or taken name, ``AdapterFormatError`` for a directory that is not
        a LoRA of this model (nothing reaches the providers until a request uses it)."""
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is given twice")
        self.adapters[name] = self.model.load_adapter(directory)

    def model_names(self) -> list[str]:
        """The names requests may use: the base model, then one per adapter."""
        return [self.name, *(f"{self.name}:{a}" for a in self.adapters)]

    def adapter_for(self, model: str) -> RemoteLora | None:
        """The adapter that model name ``model`` asks for (None: the base model); KeyError
        for a name this gateway does not serve."""
        if model == self.name:
            return None
        base, colon, adapter = model.partition(":")
        if base == self.name and colon and adapter in self.adapters:
            return self.adapters[adapter]
        raise KeyError(model)

    def release_adapters(self) -> None:
        """Delete the adapters' copies on the providers (best effort: unused ones expire there)."""
        adapters, self.adapters = self.adapters, {}
        for name, adapter in adapters.items():
            try:
                self.model.release_adapter(adapter)
            except Exception as e:  # noqa: BLE001 - shutting down: the providers expire them anyway
                logger.warning(f"adapter {name}: could not delete its copies ({e}); they expire on the providers")

    def model_for_job(self) -> DistributedModelForCausalLM:
        """A model of its own for a paid request (a job attaches to one model), sharing the
        swarm runtime and the client-side weights with every other request."""
        from client_sdk.swarm.model import DistributedModelForCausalLM

        shared = self.model
        return DistributedModelForCausalLM(
            shared.info, shared.parts, shared.runtime, owns_runtime=False, push=shared.push
        )

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens: the text as the tokenizer encodes it, or the messages through
        the model's chat template with the assistant's turn opened."""
        if request.kind == "chat":
            if not getattr(self.tokenizer, "chat_template", None):
                raise OpenAIError(
                    400,
                    f"model {self.name} has no chat template; use /v1/completions with a prompt",
                    param="messages",
                    code="no_chat_template",
                )
            ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(request.prompt).input_ids
        return [int(t) for t in ids]

    def budget(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """``max_tokens`` checked against the context (the default fills what the context leaves)."""
        room = self.context - prompt_tokens
        if room < 1:
            raise OpenAIError(
                400,
                f"the prompt is {prompt_tokens} tokens; model {self.name}'s context holds {self.context}, "
                f"leaving no room to generate. Shorten the prompt or the messages.",
                param="messages" if request.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if request.max_tokens is None:
            return room
        if request.max_tokens > room:
            param = "max_tokens"
            raise bad_request(
                param,
                f"the prompt ({prompt_tokens} tokens) plus {request.max_tokens} new tokens exceed model "
                f"{self.name}'s context of {self.context} tokens; ask for at most {room}",
                code="context_length_exceeded",
            )
        return request.max_tokens


def _context_length(path: Path, tokenizer: Any) -> int:
    try:
        config = json.loads((path / "config.json").read_text())
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(min(tokenizer.model_max_length, 1 << 20))


@dataclass
class _Choice:
    ids: list[int] = field(default_factory=list)
    tokens: int = 0  # generated, the end-of-sequence token included
    text: str = ""  # the answer so far (final once finished)
    emitted: int = 0  # characters of ``text`` already streamed
    finish: str | None = None


class Choices:
    """The text of ``n`` choices, one token column at a time: stop strings end a choice (the
    text before them is its answer), as does the end-of-sequence token; streamed text holds
    back what could be the start of a stop string or an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any, n: int, stop: list[str], eos_token_id: int | None) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, stop, eos_token_id
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.choices = [_Choice() for _ in range(n)]

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def push(self, column: list[int]) -> list[Delta]:
        deltas = []
        for index, (choice, token) in enumerate(zip(self.choices, column, strict=True)):
            if choice.finish is not None:
                continue
            choice.tokens += 1
            if self.eos is not None and token == self.eos:
                deltas.append(self._finish(index, "stop"))
                continue
            choice.ids.append(token)
            text = self.tokenizer.decode(choice.ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                choice.text = text[:cut]
                deltas.append(self._finish(index, "stop"))
                continue
            choice.text = text
            safe = len(text.rstrip("\ufffd")) - self.hold
            if safe > choice.emitted:
                deltas.append((index, text[choice.emitted : safe], None))
                choice.emitted = safe
        return deltas

    def finish_all(self, reason: str = "length") -> list[Delta]:
        return [self._finish(i, reason) for i, c in enumerate(self.choices) if c.finish is None]

    def _finish(self, index: int, reason: str) -> Delta:
        choice = self.choices[index]
        choice.finish = reason
        rest = choice.text[choice.emitted :]
        choice.emitted = len(choice.text)
        return (index, rest, reason)


class MarketPayer:
    """Each request as a paid job of the caller's key on the marketplace at ``base_url``:
    the job holds ``budget``, the SDK routes by its plan with its tickets, receipts are
    countersigned and uploaded, and the job settles when the request ends."""

    def __init__(
        self,
        base_url: str,
        *,
        budget: int,
        max_price: int,
        plan_timeout: float = 60.0,
        price_ttl: float = 30.0,
        transport: Any = None,
    ) -> None:
        self.base_url, self.budget, self.max_price = base_url, budget, max_price
        self.price_ttl = price_ttl
        self.plan_timeout, self.transport = plan_timeout, transport
        self._prices: dict[str, tuple[float, int | None]] = {}
        self._lock = threading.Lock()

    def client(self, api_key: str) -> Client:
        from hivemart_core.api import Client

        return Client(api_key=api_key, base_url=self.base_url, transport=self.transport)

    def open(self, api_key: str, model: DistributedModelForCausalLM) -> MarketJob:
        from client_sdk.swarm.job import MarketJob
        from hivemart_core.errors import APIError
        from hivemart_core.protocol.identity import Identity

        client = self.client(api_key)
        created = None
        try:
            with market_errors(self.budget):
                identity = Identity.generate()
                created = client.jobs.create(
                    model=model.info.model_id,
                    kind="inference",
                    budget=self.budget,
                    max_price=self.max_price,
                    client_key=identity.public_key,
                )
                job = MarketJob.open(client, created.id, identity, plan_timeout=self.plan_timeout)
                job.attach(model)
        except BaseException:
            if created is not None:  # never planned or never started: give its hold back now
                try:
                    client.jobs.cancel(created.id)
                except APIError as e:
                    logger.warning(f"job {created.id}: could not cancel it ({e}); its hold expires by itself")
            client.close()
            raise
        return job

    def check_key(self, api_key: str) -> None:
        client = self.client(api_key)
        try:
            with market_errors(self.budget):
                client.accounts.me()
        finally:
            client.close()

    def price_per_million_tokens(self, api_key: str, model_id: str, num_blocks: int) -> int | None:
        """The cheapest price of a million tokens through every block at the offers of online
        providers (micro-credits; None when some block has no offer), cached for ``price_ttl`` seconds."""
        from hivemart_core.figures import cheapest_price_per_million_tokens

        with self._lock:
            cached = self._prices.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < self.price_ttl:
            return cached[1]
        client = self.client(api_key)
        try:
            with market_errors(self.budget):
                offers = client.models.offers(model_id)
        finally:
            client.close()
        price = cheapest_price_per_million_tokens(num_blocks, [(o.block_start, o.block_end, o.price) for o in offers])
        with self._lock:
            self._prices[model_id] = (time.monotonic(), price)
        return price


class market_errors:
    """Marketplace and plan errors as OpenAI errors: a bad key 401, an empty wallet 402."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        from client_sdk.swarm.job import JobPlanError
        from hivemart_core.errors import (
            APIConnectionError,
            APIError,
            AuthenticationError,
            InsufficientCreditsError,
            PermissionDeniedError,
            RateLimitError,
        )

        if error is None or isinstance(error, OpenAIError):
            return
        if isinstance(error, AuthenticationError):
            raise OpenAIError(
                401,
                "Incorrect API key provided: send your Hivemart API key as `Authorization: Bearer <key>` "
                "(`hivemart keys create` makes one)",
                code="invalid_api_key",
            ) from error
        if isinstance(error, InsufficientCreditsError):
            raise OpenAIError(
                402,
                f"Your wallet cannot cover this request: each request holds {self.budget} micro-credits "
                f"until it settles ({error.message}). Add credits (`hivemart balance` shows what you have).",
                type="insufficient_quota",
                code="insufficient_quota",
            ) from error
        if isinstance(error, PermissionDeniedError):
            raise OpenAIError(403, f"The marketplace refused: {error.message}", code="permission_denied") from error
        if isinstance(error, RateLimitError):
            raise OpenAIError(
                429,
                f"The marketplace is rate limiting this key: {error.message}",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            ) from error
        if isinstance(error, JobPlanError):
            raise OpenAIError(
                503,
                f"No providers could be planned for this request: {error}",
                type="server_error",
                code="no_providers",
            ) from error
        if isinstance(error, APIConnectionError):
            raise OpenAIError(
                502, f"The marketplace cannot be reached: {error}", type="server_error", code="market_unreachable"
            ) from error
        if isinstance(error, APIError):
            raise OpenAIError(
                502, f"The marketplace answered an error: {error}", type="server_error", code="market_error"
            ) from error


class Generation:
    """One request: its prompt, its choices and (paid) its job; :meth:`run` in a worker thread."""

    def __init__(self, served: Served, request: GenerationRequest) -> None:
        self.served, self.request = served, request
        self.adapter = served.adapter_for(request.model)  # KeyError: not served here
        self.prompt = served.prompt_ids(request)
        self.max_tokens = served.budget(request, len(self.prompt))
        self.choices = Choices(served.tokenizer, request.n, request.stop, served.tokenizer.eos_token_id)
        self.cancelled = threading.Event()  # the client went away: stop at the next token
        self.model = served.model  # a paid request gets a model of its own (see open)
        self.job: MarketJob | None = None
        self.settlement: dict[str, Any] | None = None

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.prompt), self.choices.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def open(self, payer: MarketPayer | None, api_key: str) -> None:
        """With a payer, create this request's job (before any answer, so that a bad key or an
        empty wallet is the response's status)."""
        if payer is not None:
            self.model = self.served.model_for_job()
            self.job = payer.open(api_key, self.model)

    def run(self, on_deltas: Callable[[list[Delta]], None] | None = None) -> None:
        """Generate until every choice finished, ``max_tokens``, or :attr:`cancelled`; a paid
        job is finished (receipts uploaded, the job settling) whatever happened."""
        import torch

        from hivemart_core.errors import HivemartError

        def on_token(column: torch.Tensor) -> None:  # on the swarm loop: keep it short
            deltas = self.choices.push([int(t) for t in column.tolist()])
            if on_deltas is not None and deltas:
                on_deltas(deltas)
            if self.choices.done or self.cancelled.is_set():
                raise _Stop

        input_ids = torch.tensor([self.prompt] * self.request.n, dtype=torch.long)
        try:
            sdk_generate(
                self.model,
                input_ids,
                max_new_tokens=self.max_tokens,
                temperature=self.request.temperature,
                top_p=self.request.top_p,
                seed=self.request.seed,
                eos_token_id=self.served.tokenizer.eos_token_id,
                on_token=on_token,
                adapter=self.adapter,
            )
        except _Stop:
            pass
        except HivemartError as e:
            raise OpenAIError(
                502, f"The swarm failed this request: {e}", type="server_error", code="swarm_error"
            ) from e
        finally:
            self.settle()
        rest = self.choices.finish_all()
        if on_deltas is not None and rest and not self.cancelled.is_set():
            on_deltas(rest)

    def settle(self) -> None:
        """Finish the paid job, if any: the work received so far is paid, the rest of the hold returns."""
        job, self.job = self.job, None
        if job is None:
            return
        try:
            self.settlement = job.finish()
        except Exception as e:  # noqa: BLE001 - the answer is generated; the job settles by the sweeps
            logger.warning(f"job {job.job_id}: could not finish it ({e}); the scheduler's sweeps settle it")
        finally:
            job.detach()
            job.client.close()
