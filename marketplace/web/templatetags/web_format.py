"""Template filters for money and figures: :mod:`hivemart_core.figures`'s rules, which the CLI
prints with too, so a page and a command show the same amount the same way. Money stays
integer: no float ever touches it."""

from __future__ import annotations

from django import template

from hivemart_core import figures

register = template.Library()


@register.filter
def credits(micro: int | None) -> str:
    """Integer micro-credits as credits with six decimals: 1500000 -> "1.500000"."""
    return figures.DASH if micro is None else figures.format_credits(micro)


@register.filter
def figure(value: float | None) -> str:
    """A measured figure rounded for reading (one decimal from 100 up, else three significant digits)."""
    return figures.format_figure(value)


@register.filter
def throughput(value: float | None) -> str:
    """Work units per second with their unit: "886.5 tokens/s/block"."""
    return figures.format_throughput(value)


@register.filter
def latency(value: float | None) -> str:
    """Milliseconds per token with the unit: "17.2 ms/token"."""
    return figures.format_latency(value)


@register.filter
def percent(fraction: float | None) -> str:
    """A fraction 0..1 as a percentage with one decimal, or a dash when unknown."""
    return figures.format_percent(fraction)


@register.filter
def get_item(mapping: dict | None, key: object) -> object:
    """``mapping[key]``, or None when absent (templates cannot index by a variable)."""
    return None if mapping is None else mapping.get(key)
