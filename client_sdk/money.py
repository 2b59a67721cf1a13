"""Money as the SDK shows it. Amounts are integer micro-credits everywhere; no float touches them.

The rules live in :mod:`hivemart_core.figures`, shared with the marketplace's web pages, so the
CLI and the web print the same amount the same way."""

from __future__ import annotations

from hivemart_core.figures import MICRO_PER_CREDIT, format_credits

__all__ = ["MICRO_PER_CREDIT", "format_credits"]
