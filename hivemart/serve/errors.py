"""Errors as OpenAI's API returns them: ``{"error": {"message", "type", "param", "code"}}``
with the status code its clients map to exception classes (401 AuthenticationError, 402/429
for money, 400 BadRequestError, ...)."""

from __future__ import annotations

from typing import Any

__all__ = ["OpenAIError", "bad_request", "error_body"]


class OpenAIError(Exception):
    """An error the gateway answers with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    """A 400 about one request field (``param`` names it as the request spells it)."""
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)
