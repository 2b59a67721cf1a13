"""Inline SVG charts, computed on the server (no JavaScript, nothing loaded from elsewhere).

Pure Python: the functions turn figures into geometry; the templates only draw it, so every
label goes through Django's autoescaping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bar", "BarChart", "coverage_chart"]


@dataclass(frozen=True)
class Bar:
    """One block's bar: ``height`` is proportional to its throughput; ``covered`` is False for
    a block no online provider serves (drawn as a hole along the axis)."""

    index: int
    x: float
    y: float
    width: float
    height: float
    throughput: float
    providers: int
    covered: bool


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    plot_top: int
    plot_bottom: int
    plot_left: int
    max_value: float
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (y, label) of the value axis
    label_every: int  # label every n-th block under the axis, so labels never overlap


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (axis maximum)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def _format(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def coverage_chart(
    throughputs: Sequence[float], providers: Sequence[int], *, width: int = 640, height: int = 180
) -> BarChart:
    """A bar per block: its throughput (work units/s, the sum over the online providers serving
    it) and how many providers serve it. ``throughputs`` and ``providers`` are per block."""
    if len(throughputs) != len(providers) or not throughputs:
        raise ValueError("one throughput and one provider count per block, at least one block")
    left, right, top, bottom = 48, 8, 8, height - 22
    plot_width = width - left - right
    slot = plot_width / len(throughputs)
    gap = min(2.0, slot * 0.2)
    top_value = _nice_ceiling(max(throughputs))
    bars = []
    for index, (value, count) in enumerate(zip(throughputs, providers, strict=False)):
        # A covered block keeps a sliver of height so that it never looks like a hole.
        bar_height = max((bottom - top) * value / top_value, 2.0 if count else 0.0)
        bars.append(
            Bar(
                index=index,
                x=round(left + index * slot + gap / 2, 2),
                y=round(bottom - bar_height, 2),
                width=round(slot - gap, 2),
                height=round(bar_height, 2),
                throughput=value,
                providers=count,
                covered=count > 0,
            )
        )
    ticks = [(round(bottom - (bottom - top) * f, 2), _format(top_value * f)) for f in (0.0, 0.5, 1.0)]
    label_every = max(1, math.ceil(len(throughputs) / max(1, plot_width // 28)))
    return BarChart(
        width=width,
        height=height,
        plot_top=top,
        plot_bottom=bottom,
        plot_left=left,
        max_value=top_value,
        bars=bars,
        ticks=ticks,
        label_every=label_every,
    )
