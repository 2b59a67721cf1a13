"""Request checks: every request is validated here before it touches a tensor (span, shapes
and dtypes declared in a head, finite values, whether the server accepts work at all)."""

from __future__ import annotations

import torch

from hivemart_core.protocol import error_codes as codes
from hivemart_core.protocol.framing import Head
from hivemart_core.protocol.rpc import SpanRequest
from provider_agent.limits import RequestError
from provider_agent.server.core import ServerCore


def _wire_torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)  # a name the framing checked against its list of wire dtypes


class RequestChecks(ServerCore):
    """Checks that raise :class:`RequestError` with the code the client gets."""

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise RequestError(codes.NOT_ACCEPTING, "this provider is shutting down or moving; use another")

    def _check_span(self, start: int, end: int) -> None:
        if not (self.backend.start <= start < end <= self.backend.end):
            raise RequestError(
                codes.BAD_SPAN,
                f"blocks {start}:{end} are outside this provider's span {self.backend.start}:{self.backend.end}",
            )

    def _check_hidden(self, tensor: torch.Tensor, what: str, *, batch_size: int | None = None) -> None:
        hidden_size = self.backend.info.hidden_size
        if tensor.ndim != 3 or tensor.shape[2] != hidden_size or tensor.shape[1] == 0 or tensor.shape[0] == 0:
            raise RequestError(
                codes.BAD_SHAPE,
                f"{what} must have shape [batch, tokens, {hidden_size}] with "
                f"batch, tokens >= 1; got {list(tensor.shape)}",
            )
        if tensor.dtype != self.backend.dtype:
            raise RequestError(
                codes.BAD_DTYPE, f"{what} must be {self.backend.dtype} (this provider's dtype); got {tensor.dtype}"
            )
        if batch_size is not None and tensor.shape[0] != batch_size:
            raise RequestError(
                codes.BAD_SHAPE, f"{what} has batch {tensor.shape[0]}; the session was opened for {batch_size}"
            )
        if tensor.shape[0] > self.config.max_batch_size:
            raise RequestError(
                codes.TOO_LARGE,
                f"batch {tensor.shape[0]} exceeds this provider's limit of {self.config.max_batch_size}",
            )
        if tensor.shape[0] * tensor.shape[1] > self.config.max_request_tokens:
            raise RequestError(
                codes.TOO_LARGE,
                f"{tensor.shape[0] * tensor.shape[1]} tokens exceed this provider's "
                f"limit of {self.config.max_request_tokens} per request",
            )
        if tensor.device.type != "meta":
            self._check_finite(tensor, what)

    @staticmethod
    def _check_finite(tensor: torch.Tensor, what: str) -> None:
        if not torch.isfinite(tensor).all():
            raise RequestError(codes.BAD_VALUE, f"{what} contains NaN or infinite values")

    def _check_prompts(self, prompts: torch.Tensor, request: SpanRequest, hidden: torch.Tensor) -> None:
        blocks, (batch, tokens, hidden_size) = request.end - request.start, hidden.shape
        if (
            prompts.ndim != 4
            or prompts.shape[0] != blocks
            or prompts.shape[1] not in (1, batch)
            or not 1 <= prompts.shape[2] <= tokens
            or prompts.shape[3] != hidden_size
        ):
            raise RequestError(
                codes.BAD_SHAPE,
                f"deep prompts must have shape [{blocks}, 1 or {batch}, prefix, "
                f"{hidden_size}] with 1 <= prefix <= {tokens}; got {list(prompts.shape)}",
            )
        if prompts.dtype != self.backend.dtype:
            raise RequestError(codes.BAD_DTYPE, f"deep prompts must be {self.backend.dtype}; got {prompts.dtype}")
        if prompts.device.type != "meta":
            self._check_finite(prompts, "deep prompts")

    def _parse_span_request(self, head: Head, tensor_names: tuple[str, ...]) -> SpanRequest:
        """Validate a forward or backward request from its head alone, before any tensor is
        read: span, tensor count, declared shapes and dtypes."""
        self._check_accepting()
        request = SpanRequest.from_header(head.header)
        self._check_span(request.start, request.end)
        with_prompts = request.tuning is not None and request.tuning.prompts
        names = tensor_names + (("deep prompts",) if with_prompts else ())
        if len(head.descriptors) != len(names):
            raise RequestError(codes.BAD_REQUEST, f"expected {len(names)} tensors: {', '.join(names)}")
        # Shape-only stand-ins: the checks below read shapes and dtypes, never data.
        declared = [torch.empty(shape, dtype=_wire_torch_dtype(dtype), device="meta") for dtype, shape in head.shapes()]
        tensors = declared[: len(tensor_names)]
        for tensor, name in zip(tensors, tensor_names, strict=False):
            self._check_hidden(tensor, name)
        if any(t.shape != tensors[0].shape for t in tensors):
            raise RequestError(
                codes.BAD_SHAPE,
                f"{' and '.join(tensor_names)} must have the same shape; got {[list(t.shape) for t in tensors]}",
            )
        if with_prompts:
            self._check_prompts(declared[-1], request, tensors[0])
        return request
