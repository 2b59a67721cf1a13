"""Money as the SDK shows it. Amounts are integer micro-credits everywhere; no float touches them."""

from __future__ import annotations

__all__ = ["MICRO_PER_CREDIT", "format_credits"]

MICRO_PER_CREDIT = 1_000_000


def format_credits(micro: int) -> str:
    """Micro-credits as a decimal number of credits, exactly: 1500000 -> "1.500000"."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"
