"""``hivemart serve``: an OpenAI-compatible HTTP gateway in front of the swarm.

- :mod:`hivemart.serve.errors`: OpenAI's error shape and status codes.
- :mod:`hivemart.serve.requests`: every request field validated into a :class:`GenerationRequest`.
- :mod:`hivemart.serve.engine`: one generation through the SDK (free, or as a paid marketplace
  job of the caller's key), the text of each choice as it streams, stop strings, usage.
- :mod:`hivemart.serve.app`: the Starlette application (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``); uvicorn runs it (``hivemart serve``).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str) -> object:
    if name == "create_app":
        from hivemart.serve.app import create_app

        return create_app
    raise AttributeError(name)
