"""The web app's pure helpers: the coverage chart, uptime and the money/figure filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from marketplace.providers.selectors import online_fraction
from marketplace.web.charts import coverage_chart
from marketplace.web.templatetags.web_format import credits, figure, percent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def test_chart_bars_scale_with_throughput_and_mark_holes() -> None:
    chart = coverage_chart([100.0, 50.0, 0.0, 0.0], [2, 1, 1, 0])
    assert chart.max_value == 100.0
    full, half, served_but_unmeasured, hole = chart.bars
    plot = chart.plot_bottom - chart.plot_top
    assert full.height == pytest.approx(plot) and half.height == pytest.approx(plot / 2)
    # Served without a throughput figure is still visibly served; a hole has no bar.
    assert served_but_unmeasured.covered and served_but_unmeasured.height > 0
    assert not hole.covered and hole.height == 0
    assert [b.x for b in chart.bars] == sorted(b.x for b in chart.bars)
    assert all(b.x + b.width <= chart.width for b in chart.bars)


def test_chart_axis_is_rounded_up_and_labels_thinned_for_many_blocks() -> None:
    chart = coverage_chart([1234.0] * 80, [1] * 80)
    assert chart.max_value == 2000.0
    assert [label for _, label in chart.ticks] == ["0", "1k", "2k"]
    assert chart.label_every > 1


@pytest.mark.parametrize("throughputs, providers", [([], []), ([1.0], [1, 2])])
def test_chart_rejects_mismatched_input(throughputs: list, providers: list) -> None:
    with pytest.raises(ValueError):
        coverage_chart(throughputs, providers)


def test_uptime_counts_online_time_within_the_window() -> None:
    transitions = [(at(2), "online"), (at(6), "offline"), (at(8), "online")]
    # offline 0-2, online 2-6, offline 6-8, online 8-10: 6 of 10 hours.
    assert online_fraction(transitions, initial_state="offline", start=at(0), end=at(10)) == pytest.approx(0.6)


def test_uptime_starts_at_registration_when_later_than_the_window() -> None:
    transitions = [(at(5), "joining"), (at(6), "online")]
    assert online_fraction(transitions, initial_state=None, start=at(0), end=at(10)) == pytest.approx(0.8)


def test_uptime_without_any_known_state_is_unknown() -> None:
    assert online_fraction([], initial_state=None, start=at(0), end=at(10)) is None
    assert online_fraction([], initial_state="online", start=at(0), end=at(10)) == 1.0


@pytest.mark.parametrize(
    "micro, text",
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (1_500_000, "1.500000"),
        (-10_000_000, "-10.000000"),  # the same six decimals as 9.999274: never "-10.00" beside it
        (1_234_567_890, "1234.567890"),
        (-7, "-0.000007"),
        (None, "–"),
    ],
)
def test_credits_are_formatted_without_floats(micro: int | None, text: str) -> None:
    assert credits(micro) == text


def test_credits_refuse_floats() -> None:
    with pytest.raises(TypeError):
        credits(1.5)  # type: ignore[arg-type]


def test_figures_and_percentages() -> None:
    assert figure(None) == "–" and figure(12_345.0) == "12,345" and figure(2_500_000.0) == "2,500,000"
    assert figure(0.5) == "0.5" and figure(2000.0) == "2,000" and figure(886.5452454739941) == "886.5"
    assert percent(None) == "–" and percent(0.987) == "98.7%"
