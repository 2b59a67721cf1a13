"""Template filters for money and figures. Money stays integer: no float ever touches it."""

from __future__ import annotations

from django import template

register = template.Library()

MICRO = 1_000_000


@register.filter
def credits(micro: int | None) -> str:
    """Integer micro-credits as credits with up to six decimals: 1500000 -> "1.50", -7 -> "-0.000007"."""
    if micro is None:
        return "–"
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"credits are integer micro-credits, got {micro!r}")
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    decimals = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole:,}.{decimals}"


@register.filter
def figure(value: float | None) -> str:
    """A measured figure (throughput, latency) with three significant digits, or a dash."""
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    if value >= 1e3:
        return f"{value:,.0f}"
    return f"{value:.3g}"


@register.filter
def percent(fraction: float | None) -> str:
    """A fraction 0..1 as a percentage with one decimal, or a dash when unknown."""
    if fraction is None:
        return "–"
    return f"{100 * fraction:.1f} %"
