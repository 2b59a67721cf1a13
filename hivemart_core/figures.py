"""Money and figures as people read them: one set of rules for the CLI, the SDK and the web.

- **Credits** always print with six decimals (a micro-credit is the smallest amount, so six
  decimals are exact and never mix with a shorter form): ``1500000`` -> ``"1.500000"``.
  Integer arithmetic only; no float touches money.
- **Prices** are micro-credits per million *work units* (one token through one block,
  docs/protocol.md). A token through a span of ``k`` blocks is ``k`` units, so a span's price
  per million tokens is exactly ``price * k`` micro-credits (times the passes of the job's
  kind: a fine-tuning token also pays its backward pass).
- **Figures** (throughput, latency) are rounded: whole from 1000 up, one decimal from 100,
  three significant digits below, always with their unit (``"886.5 tokens/s/block"``, ``"17.2 ms/token"``).
- **Uptime** always states the window it was measured over, which is shorter than the
  nominal one for a provider younger than it (``"100.0% over the last 3 min (since it
  registered)"``), so a minute-old provider never reads as "100% over 24 h".
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "MICRO_PER_CREDIT",
    "cost_of_units",
    "format_credits",
    "format_duration",
    "format_figure",
    "format_latency",
    "format_percent",
    "format_price",
    "format_price_per_million_tokens",
    "format_throughput",
    "format_uptime",
    "price_per_million_tokens",
    "chain_price_per_million_tokens",
    "cheapest_price_per_million_tokens",
]

MICRO_PER_CREDIT = 1_000_000
UNITS_PER_PRICE = 1_000_000  # prices are per million work units
DASH = "–"


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer number of micro-credits, got {value!r}")
    return value


def format_credits(micro: int) -> str:
    """Integer micro-credits as credits with exactly six decimals: 1500000 -> "1.500000",
    -7 -> "-0.000007". A float is refused (TypeError): money is never a float."""
    micro = _check_int(micro, "an amount")
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"


def format_price(price: int) -> str:
    """A price (micro-credits per million work units) in credits with its unit."""
    return f"{format_credits(price)} credits/M units"


def cost_of_units(units: int, price: int) -> int:
    """Micro-credits ``units`` work units cost at ``price``, rounded up (the settlement rule:
    any paid work pays at least one micro-credit)."""
    units, price = _check_int(units, "units"), _check_int(price, "a price")
    return -(-units * price // UNITS_PER_PRICE)


def price_per_million_tokens(price: int, blocks: int, *, passes: int = 1) -> int:
    """Micro-credits a million tokens cost through ``blocks`` blocks at ``price`` per million
    work units: ``price * blocks * passes``, exact (a token through k blocks is k units)."""
    price, blocks, passes = _check_int(price, "a price"), _check_int(blocks, "blocks"), _check_int(passes, "passes")
    if blocks < 0 or passes < 1:
        raise ValueError(f"blocks must be >= 0 and passes >= 1, got {blocks} and {passes}")
    return price * blocks * passes


def chain_price_per_million_tokens(spans: Iterable[tuple[int, int]], *, passes: int = 1) -> int:
    """Micro-credits a million tokens cost through a chain of ``(price, blocks)`` spans."""
    return sum(price_per_million_tokens(price, blocks, passes=passes) for price, blocks in spans)


def cheapest_price_per_million_tokens(num_blocks: int, offers: Iterable[tuple[int, int, int]]) -> int | None:
    """Micro-credits a million tokens cost through all ``num_blocks`` blocks at the cheapest
    offers, ``offers`` being ``(block_start, block_end, price)`` (a provider may be asked for any
    part of its span, so each block is bought where it is cheapest); None when a block has no offer."""
    cheapest: list[int | None] = [None] * num_blocks
    for start, end, price in offers:
        for block in range(max(0, start), min(end, num_blocks)):
            current = cheapest[block]
            cheapest[block] = price if current is None else min(current, price)
    if any(price is None for price in cheapest):
        return None
    return sum(price for price in cheapest if price is not None)


def format_price_per_million_tokens(micro: int) -> str:
    return f"{format_credits(micro)} credits/M tokens"


def format_figure(value: float | None) -> str:
    """A measured figure rounded for reading: whole numbers from 1000 up ("12,346"), one
    decimal from 100 ("886.5"), three significant digits below ("17.2", "0.0412"); a dash
    when unknown."""
    if value is None or not math.isfinite(value):
        return DASH
    if abs(value) >= 999.95:
        return f"{value:,.0f}"
    if abs(value) >= 99.95:
        return f"{value:,.1f}"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def format_throughput(units_per_s: float | None) -> str:
    """A throughput in work units per second, i.e. tokens per second through one block."""
    return DASH if units_per_s is None else f"{format_figure(units_per_s)} tokens/s/block"


def format_latency(ms: float | None) -> str:
    """A per-token latency in milliseconds."""
    return DASH if ms is None else f"{format_figure(ms)} ms/token"


def format_percent(fraction: float | None) -> str:
    """A fraction 0..1 as a percentage with one decimal ("97.3%"), or a dash."""
    return DASH if fraction is None else f"{100 * fraction:.1f}%"


def format_duration(seconds: float) -> str:
    """A window's length, rounded to the unit that reads best: "45 s", "3 min", "5 h", "7 d"."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} d"


def format_uptime(fraction: float | None, observed_s: float, window_s: float) -> str:
    """Uptime with the window it covers: the nominal window, or the provider's shorter
    observed life ("since it registered") so that a new provider's 100% is not over-read."""
    if fraction is None:
        return "unknown (no state recorded yet)"
    if observed_s < window_s:
        return f"{format_percent(fraction)} over the last {format_duration(observed_s)} (since it registered)"
    return f"{format_percent(fraction)} over the last {format_duration(window_s)}"
