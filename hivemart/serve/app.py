"""The gateway's Starlette application: OpenAI's ``/v1`` routes over one served model.

Requests share the model's swarm runtime; each generation runs in a worker thread of a
bounded pool (a request beyond ``max_concurrent`` is answered 429, which OpenAI's clients
retry). A streamed request whose client disconnects stops at its next token, and a paid one's
job is finished for the tokens generated until then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hivemart.serve.engine import Delta, Generation, MarketPayer, Served
from hivemart.serve.errors import OpenAIError, error_body
from hivemart.serve.requests import MAX_BODY_BYTES, GenerationRequest, parse_body, parse_chat, parse_completion
from hivemart_core.figures import format_credits

__all__ = ["create_app", "Gateway"]

logger = logging.getLogger("hivemart.serve")

MAX_KEY_CHARS = 512


class Gateway:
    """Authentication, admission and the responses of each route."""

    def __init__(
        self,
        served: Served,
        *,
        payer: MarketPayer | None,
        api_key: str | None,
        max_concurrent: int,
    ) -> None:
        self.served, self.payer, self.api_key = served, payer, api_key
        self.max_concurrent = max_concurrent
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="hivemart-serve")
        self.active: set[Generation] = set()
        # The last requests' outcomes (tokens, cancelled, the paid job's settlement), for logs and tests.
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self.created = int(time.time())

    # --- auth and admission ------------------------------------------------------------------------

    def authenticate(self, request: Request) -> str:
        """The caller's bearer key: the gateway's own key in free mode, a Hivemart API key
        (checked by the marketplace) with a market; anything (or nothing) when open."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if self.payer is None and self.api_key is None:
                return ""
            raise OpenAIError(
                401,
                "You didn't provide an API key: send `Authorization: Bearer <Hivemart API key>`",
                code="invalid_api_key",
            )
        if len(token) > MAX_KEY_CHARS or not token.isascii() or not token.isprintable():
            raise OpenAIError(401, "Incorrect API key provided: it is not a Hivemart API key", code="invalid_api_key")
        if self.api_key is not None and not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided for this gateway", code="invalid_api_key")
        return token

    def admit(self, generation: Generation) -> None:
        if len(self.active) >= self.max_concurrent:
            raise OpenAIError(
                429,
                f"The gateway is serving its maximum of {self.max_concurrent} concurrent requests; retry shortly",
                type="rate_limit_error",
                code="gateway_busy",
            )
        self.active.add(generation)

    def release(self, generation: Generation, request_id: str, status: str) -> None:
        if generation not in self.active:
            return
        self.active.discard(generation)
        outcome = {
            "id": request_id,
            "status": status,
            "cancelled": generation.cancelled.is_set() and status != "done",
            **generation.usage,
            "job": None if generation.settlement is None else generation.settlement["job"],
            "job_state": None if generation.settlement is None else generation.settlement.get("state"),
        }
        self.recent.append(outcome)
        logger.info(
            f"{request_id}: {status}, {outcome['prompt_tokens']} prompt + {outcome['completion_tokens']} tokens"
        )

    # --- routes ----------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        key = self.authenticate(request)
        card = await self._model_card(key)
        # Each adapter is a model of its own, priced as the base model (the same blocks run).
        return JSONResponse({"object": "list", "data": [{**card, "id": name} for name in self.served.model_names()]})

    async def model(self, request: Request) -> Response:
        key = self.authenticate(request)
        name = request.path_params["name"]
        if name not in self.served.model_names():
            raise self._unknown_model(name)
        return JSONResponse({**await self._model_card(key), "id": name})

    async def _model_card(self, key: str) -> dict[str, Any]:
        info = self.served.model.info
        price: int | None = 0
        if self.payer is not None:
            payer = self.payer
            await asyncio.to_thread(payer.check_key, key)
            price = await asyncio.to_thread(payer.price_per_million_tokens, key, info.model_id, info.num_blocks)
        return {
            "id": self.served.name,
            "object": "model",
            "created": self.created,
            "owned_by": "hivemart",
            "context_length": self.served.context,
            "hivemart": {
                "model_id": info.model_id,
                "num_blocks": info.num_blocks,
                "paid": self.payer is not None,
                # Micro-credits for a million tokens through every block at the cheapest offers
                # (None while some block has no online offer); 0 on a free swarm.
                "price_per_million_tokens": price,
                "price_per_million_tokens_credits": None if price is None else format_credits(price),
            },
        }

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    async def _generate(self, request: Request, parse: Callable[[dict[str, Any]], GenerationRequest]) -> Response:
        key = self.authenticate(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise OpenAIError(413, f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        spec = parse(parse_body(await request.body()))
        if spec.model not in self.served.model_names():
            raise self._unknown_model(spec.model)
        generation = Generation(self.served, spec)
        request_id = f"{'chatcmpl' if spec.kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        self.admit(generation)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.pool, generation.open, self.payer, key)
        except BaseException:
            self.release(generation, request_id, "refused")
            raise
        if spec.stream:
            return StreamingResponse(
                self._events(generation, request_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            await loop.run_in_executor(self.pool, generation.run)
        except BaseException:
            generation.cancelled.set()
            self.release(generation, request_id, "failed")
            raise
        self.release(generation, request_id, "done")
        return JSONResponse(self._completion(generation, request_id))

    async def _events(self, generation: Generation, request_id: str) -> AsyncIterator[str]:
        """Server-sent events: the choices' text as it comes, each choice's finish, usage when
        asked, then ``data: [DONE]``. Ends the generation when the client leaves."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Delta] | None] = asyncio.Queue()

        def on_deltas(deltas: list[Delta]) -> None:  # in the worker: hand over to this loop
            loop.call_soon_threadsafe(queue.put_nowait, deltas)

        future = loop.run_in_executor(self.pool, generation.run, on_deltas)
        future.add_done_callback(lambda _: queue.put_nowait(None))
        status = "cancelled"
        try:
            if generation.request.kind == "chat":  # the assistant's role first, as OpenAI streams it
                yield _sse(
                    self._chunk(generation, request_id, [(i, "", None) for i in range(generation.request.n)], role=True)
                )
            while (deltas := await queue.get()) is not None:
                yield _sse(self._chunk(generation, request_id, deltas))
            error = future.exception()
            if error is not None:
                status = "failed"
                body = error.body() if isinstance(error, OpenAIError) else error_body(str(error), type="server_error")
                yield _sse(body)
            else:
                status = "done"
                if generation.request.include_usage:
                    yield _sse(
                        {**self._head(generation, request_id, chunk=True), "choices": [], "usage": generation.usage}
                    )
            yield "data: [DONE]\n\n"
        finally:
            if status != "done":
                generation.cancelled.set()  # the worker stops at its next token and settles the job
            # The outcome (tokens generated, the job's settlement) is final once the worker ends.
            future.add_done_callback(lambda _: self.release(generation, request_id, status))

    # --- bodies --------------------------------------------------------------------------------------

    def _head(self, generation: Generation, request_id: str, *, chunk: bool = False) -> dict[str, Any]:
        chat = generation.request.kind == "chat"
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {
            "id": request_id,
            "object": kind,
            "created": int(time.time()),
            "model": generation.request.model,
            "system_fingerprint": None,
        }

    def _chunk(
        self, generation: Generation, request_id: str, deltas: list[Delta], *, role: bool = False
    ) -> dict[str, Any]:
        chat = generation.request.kind == "chat"
        choices = []
        for index, text, finish in deltas:
            if chat:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                )
                choices.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        return {**self._head(generation, request_id, chunk=True), "choices": choices}

    def _completion(self, generation: Generation, request_id: str) -> dict[str, Any]:
        chat = generation.request.kind == "chat"
        choices = []
        for index, choice in enumerate(generation.choices.choices):
            if chat:
                message = {"role": "assistant", "content": choice.text, "refusal": None}
                choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": choice.finish})
            else:
                choices.append({"index": index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish})
        body = {**self._head(generation, request_id), "choices": choices, "usage": generation.usage}
        if generation.settlement is not None:
            body["hivemart"] = {"job": generation.settlement["job"], "state": generation.settlement.get("state")}
        return body

    def _unknown_model(self, name: str) -> OpenAIError:
        return OpenAIError(
            404,
            f"The model `{name}` does not exist on this gateway; it serves "
            f"{', '.join(f'`{n}`' for n in self.served.model_names())} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    # --- lifecycle ---------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every generation at its next token, let the workers settle their jobs, then
        leave the swarm."""
        for generation in list(self.active):
            generation.cancelled.set()
        self.pool.shutdown(wait=True)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _openai_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}: this gateway serves /v1/models, /v1/completions and /v1/chat/completions"
    else:
        message = (
            f"{request.method} is not allowed on {request.url.path}" if error.status_code == 405 else str(error.detail)
        )
    return JSONResponse(error_body(message, type="invalid_request_error"), status_code=error.status_code)


async def _server_error(request: Request, error: Exception) -> Response:
    logger.exception("internal error", exc_info=error)
    return JSONResponse(
        error_body("The gateway failed unexpectedly; see its log", type="server_error"), status_code=500
    )


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(
    served: Served,
    *,
    payer: MarketPayer | None = None,
    api_key: str | None = None,
    max_concurrent: int = 32,
    close_served: bool = True,
) -> Starlette:
    """The gateway over ``served``: paid through ``payer`` (a marketplace), else free and
    guarded by ``api_key`` (``None`` with no payer: open to anyone who reaches it)."""
    if max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1")
    gateway = Gateway(served, payer=payer, api_key=api_key, max_concurrent=max_concurrent)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(gateway.shutdown)
            if close_served:  # the adapters' copies on the providers go with the model
                await asyncio.to_thread(served.release_adapters)
                served.model.close()

    app = Starlette(
        routes=[
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/v1/models/{name:path}", gateway.model, methods=["GET"]),
            Route("/v1/completions", gateway.completions, methods=["POST"]),
            Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
            Route("/healthz", _health, methods=["GET"]),
        ],
        exception_handlers={OpenAIError: _openai_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
