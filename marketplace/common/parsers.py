"""The API's JSON parser: DRF's, refusing nesting deeper than ``MAX_JSON_DEPTH`` before parsing.

Python's ``json`` recurses once per level of nesting, so a body of 50,000 ``[`` was a
RecursionError (a 500). No request the API takes nests more than a few levels; the depth is
counted on the raw bytes (strings skipped as whole tokens) before ``json`` sees them.
"""

from __future__ import annotations

import io
import re
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

MAX_JSON_DEPTH = 32
# A JSON string (escapes included) as one token, or one bracket: brackets inside strings are
# consumed with their string and never counted.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|[\]}]', re.DOTALL)
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests arrays and objects more than ``limit`` deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # too few brackets to nest that deep: the usual case, and a fast one for big bodies
    depth = 0
    for match in _TOKENS.finditer(raw):
        first = raw[match.start()]  # one byte (not the token: a string may be megabytes long)
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif first in _CLOSE:
            depth -= 1
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with a nesting limit; too deep is a 400 ``parse_error``."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        raw = stream.read() if stream is not None else b""
        if json_depth_exceeds(raw):
            raise ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        try:
            return super().parse(io.BytesIO(raw), media_type, parser_context)
        except RecursionError:  # unreachable after the depth check; a 400 all the same
            raise ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
