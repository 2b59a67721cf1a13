"""Petals' placement rule (scheduler.spans), against a brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from scheduler.spans import block_capacity, weakest_span


def test_capacity_sums_overlapping_spans_and_clips() -> None:
    assert block_capacity(4, [(0, 2, 10.0), (1, 9, 5.0)]) == [10.0, 15.0, 5.0, 5.0]
    with pytest.raises(ValueError):
        block_capacity(0, [])


def test_an_empty_swarm_starts_at_block_zero_and_a_hole_is_filled() -> None:
    assert weakest_span([0.0] * 8, 3) == (0, 3)
    assert weakest_span([9, 9, 9, 0, 9, 9], 2) == (2, 4)  # ties on the hole: [9, 0] before [0, 9]
    assert weakest_span([5, 1, 1, 5], 9) == (0, 4)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.integers(1, 12))
def test_the_chosen_window_contains_a_weakest_block_and_wins_lexicographically(capacity: list[int], length: int) -> None:
    start, end = weakest_span(capacity, length)
    n = min(length, len(capacity))
    assert end - start == n
    windows = [sorted(capacity[s:s + n]) for s in range(len(capacity) - n + 1)]
    assert sorted(capacity[start:end]) == min(windows)
    assert min(capacity[start:end]) == min(capacity)
