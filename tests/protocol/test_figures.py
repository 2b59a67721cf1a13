"""hivemart_core.figures: the one set of rules the CLI and the web print money and figures with."""

from __future__ import annotations

import pytest

from hivemart_core.figures import (
    cheapest_price_per_million_tokens,
    cost_of_units,
    format_credits,
    format_duration,
    format_figure,
    format_latency,
    format_throughput,
    format_uptime,
    price_per_million_tokens,
)


@pytest.mark.parametrize(
    "micro, text",
    [(0, "0.000000"), (7, "0.000007"), (1_500_000, "1.500000"), (-10_000_000, "-10.000000"), (9_999_274, "9.999274")],
)
def test_credits_always_have_six_decimals(micro: int, text: str) -> None:
    assert format_credits(micro) == text


@pytest.mark.parametrize("bad", [1.5, True, "3", None])
def test_money_is_never_a_float_or_a_string(bad: object) -> None:
    with pytest.raises(TypeError):
        format_credits(bad)  # type: ignore[arg-type]


def test_figures_are_rounded_with_units() -> None:
    assert format_throughput(886.5452454739941) == "886.5 tokens/s/block"
    assert format_latency(17.2345) == "17.2 ms/token"
    assert format_throughput(12_345.6) == "12,346 tokens/s/block"
    assert format_figure(0.041234) == "0.0412" and format_figure(0.0) == "0"
    assert format_throughput(None) == "–" and format_figure(float("nan")) == "–"


def test_price_per_million_tokens_is_price_times_blocks_exactly() -> None:
    # A token through a span of k blocks is k work units; prices are per million units.
    assert price_per_million_tokens(1_500, 6) == 9_000
    assert price_per_million_tokens(1_500, 6, passes=3) == 27_000  # fine-tuning pays its backward pass
    assert price_per_million_tokens(10**12, 1000) == 10**15  # integers: no rounding at any size
    with pytest.raises(ValueError):
        price_per_million_tokens(1, -1)


def test_the_cheapest_whole_model_buys_each_block_where_it_is_cheapest() -> None:
    offers = [(0, 4, 1_000), (2, 6, 300), (4, 6, 500)]
    assert cheapest_price_per_million_tokens(6, offers) == 2 * 1_000 + 4 * 300
    assert cheapest_price_per_million_tokens(7, offers) is None  # block 6 has no offer


def test_cost_of_units_rounds_up_like_settlement() -> None:
    assert cost_of_units(1, 1) == 1  # any paid work pays at least one micro-credit
    assert cost_of_units(1_000_000, 1_500) == 1_500 and cost_of_units(0, 1_500) == 0


def test_uptime_states_its_window_and_a_new_providers_shorter_one() -> None:
    day = 24 * 3600
    assert format_uptime(0.97, day, day) == "97.0% over the last 24 h"
    assert format_uptime(1.0, 60, day) == "100.0% over the last 60 s (since it registered)"
    assert format_uptime(None, 0, day).startswith("unknown")
    assert [format_duration(s) for s in (45, 180, 5 * 3600, 7 * day)] == ["45 s", "3 min", "5 h", "7 d"]
