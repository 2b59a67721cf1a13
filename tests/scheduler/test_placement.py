"""hivemart_core.placement: Petals' rule on constructed swarms and against brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemart_core.placement import InvalidSpanError, Span, best_span, block_throughputs, choose_span, should_move


def spans_with_throughputs(throughputs: list[float]) -> list[Span]:
    """One single-block span per block with the given throughput (0: nobody serves it)."""
    return [(block, block + 1, value) for block, value in enumerate(throughputs) if value]


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, list[Span]]:
    num_blocks = draw(st.integers(1, 12))
    spans = []
    for _ in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, num_blocks - 1))
        end = draw(st.integers(start + 1, num_blocks))
        spans.append((start, end, float(draw(st.integers(0, 20)))))
    return num_blocks, spans


# --- block throughputs ---------------------------------------------------------------------


def test_block_throughputs_sum_the_spans_covering_each_block() -> None:
    assert block_throughputs(6, [(0, 3, 10.0), (2, 6, 5.0), (4, 5, 2.5)]) == [10.0, 10.0, 15.0, 5.0, 7.5, 5.0]
    assert block_throughputs(3, []) == [0.0, 0.0, 0.0]


def test_uncovered_blocks_are_exactly_zero_despite_rounding() -> None:
    # 0.1 + 0.2 - 0.1 - 0.2 is not 0.0 in floating point; a hole must still read as 0.0.
    assert block_throughputs(4, [(0, 1, 0.1), (0, 2, 0.2)])[2:] == [0.0, 0.0]


@given(swarms())
def test_block_throughputs_match_the_definition(case: tuple[int, list[Span]]) -> None:
    num_blocks, spans = case
    expected = [float(sum(t for s, e, t in spans if s <= block < e)) for block in range(num_blocks)]
    assert block_throughputs(num_blocks, spans) == expected


@pytest.mark.parametrize(
    "spans, message",
    [
        ([(0, 9, 1.0)], "within 0..8"),
        ([(3, 3, 1.0)], "non-empty"),
        ([(-1, 2, 1.0)], "within"),
        ([(0, 2, -1.0)], "non-negative"),
        ([(0, 2, float("nan"))], "finite"),
        ([(0, 2)], r"\(start, end, throughput\)"),
        ([(0.0, 2, 1.0)], "non-empty range"),
    ],
)
def test_malformed_spans_are_refused(spans: list[Span], message: str) -> None:
    with pytest.raises(InvalidSpanError, match=message):
        block_throughputs(8, spans)


# --- choosing a span -----------------------------------------------------------------------


def test_holes_are_filled_first() -> None:
    # Blocks 5 and 6 have nobody; the window must cover them though its other blocks are strong.
    throughputs = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 50.0, 50.0, 50.0]
    assert choose_span(10, 3, spans_with_throughputs(throughputs)) == (4, 7)
    # The window holding more holes goes first.
    throughputs = [0.0, 5.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0]
    assert choose_span(8, 2, spans_with_throughputs(throughputs)) == (4, 6)


def test_the_weakest_block_is_raised_first_lexicographically() -> None:
    # The window 3..6 has the lowest total and the lowest average, but block 0 is the
    # weakest in the swarm, so the provider goes where it raises that one.
    throughputs = [1.0, 9.0, 9.0, 2.0, 2.0, 2.0]
    assert choose_span(6, 3, spans_with_throughputs(throughputs)) == (0, 3)
    # Equal weakest blocks: the second weakest decides.
    throughputs = [1.0, 7.0, 9.0, 9.0, 1.0, 3.0]
    assert choose_span(6, 2, spans_with_throughputs(throughputs)) == (4, 6)
    # All windows equal: the lowest start.
    assert choose_span(6, 2, [(0, 6, 4.0)]) == (0, 2)


def test_a_provider_bigger_than_the_model_serves_all_of_it() -> None:
    assert choose_span(4, 10, [(0, 4, 1.0)]) == (0, 4)
    with pytest.raises(InvalidSpanError, match="num_to_serve"):
        choose_span(4, 0, [])


@settings(max_examples=200)
@given(swarms(), st.integers(1, 12))
def test_choose_span_is_the_lexicographic_argmin(case: tuple[int, list[Span]], num_to_serve: int) -> None:
    num_blocks, spans = case
    start, end = choose_span(num_blocks, num_to_serve, spans)
    length = min(num_to_serve, num_blocks)
    assert end - start == length
    throughputs = block_throughputs(num_blocks, spans)
    windows = [sorted(throughputs[i : i + length]) for i in range(num_blocks - length + 1)]
    assert sorted(throughputs[start:end]) == min(windows)
    assert start == windows.index(min(windows))
    holes = [b for b, t in enumerate(throughputs) if t == 0]
    if holes:
        assert any(start <= b < end for b in holes), "a hole is filled first"


@settings(max_examples=100)
@given(swarms(), st.integers(1, 12))
def test_best_span_from_the_sums_decides_as_choose_span(case: tuple[int, list[Span]], num_to_serve: int) -> None:
    num_blocks, spans = case
    assert best_span(block_throughputs(num_blocks, spans), num_to_serve) == choose_span(num_blocks, num_to_serve, spans)


def test_best_span_refuses_nonsense() -> None:
    with pytest.raises(InvalidSpanError, match="num_to_serve"):
        best_span([1.0, 2.0], 0)
    with pytest.raises(InvalidSpanError, match="num_blocks"):
        best_span([], 1)


# --- moving --------------------------------------------------------------------------------


def test_moves_when_the_weakest_block_gains_more_than_the_factor() -> None:
    # Without me: blocks 0..2 at 10, blocks 2..4 at 1. I serve 0..2 at 10; the swarm's
    # minimum is 1 now and 10 once I serve 2..4 instead.
    others = [(0, 2, 10.0), (2, 4, 1.0)]
    assert should_move(4, (0, 2), 10.0, others, 1.5) == (True, (2, 4))


def test_stays_when_the_gain_is_below_the_factor() -> None:
    # Moving would raise the minimum from 10 to 11: a factor of 1.1 only.
    others = [(0, 2, 11.0), (2, 4, 10.0)]
    assert should_move(4, (0, 2), 1.0, others, 1.5) == (False, (0, 2))
    assert should_move(4, (0, 2), 1.0, others, 1.05) == (True, (2, 4))


def test_stays_when_already_in_the_best_place() -> None:
    others = [(0, 2, 10.0), (2, 4, 1.0)]
    assert should_move(4, (2, 4), 10.0, others, 1.0) == (False, (2, 4))


def test_moves_to_fill_holes() -> None:
    # Two providers on 0..2, nobody on 2..4: the second one should move.
    assert should_move(4, (0, 2), 5.0, [(0, 2, 5.0)]) == (True, (2, 4))
    # Holes either way, but fewer after the move: 2..5 has three holes, I can fill two of them.
    assert should_move(5, (0, 2), 5.0, [(0, 2, 5.0)]) == (True, (2, 4))
    # Leaving would open a hole where I am: stay.
    assert should_move(4, (0, 2), 5.0, [(2, 4, 5.0)]) == (False, (0, 2))


@settings(max_examples=200)
@given(swarms(), st.data(), st.sampled_from([1.0, 1.2, 4 / 3, 2.0]))
def test_moves_are_never_pointless_and_never_undone(
    case: tuple[int, list[Span]], data: st.DataObject, factor: float
) -> None:
    num_blocks, others = case
    start = data.draw(st.integers(0, num_blocks - 1))
    end = data.draw(st.integers(start + 1, num_blocks))
    mine = float(data.draw(st.integers(1, 20)))
    moved, span = should_move(num_blocks, (start, end), mine, others, factor)
    before = block_throughputs(num_blocks, [*others, (start, end, mine)])
    if not moved:
        assert span == (start, end)
        return
    after = block_throughputs(num_blocks, [*others, (*span, mine)])
    assert span[1] - span[0] == end - start
    assert min(after) > min(before) * factor or (min(before) == 0 and after.count(0.0) < before.count(0.0))
    # From the new place, the same swarm never sends it back.
    assert should_move(num_blocks, span, mine, others, factor) == (False, span)


def test_malformed_move_arguments_are_refused() -> None:
    with pytest.raises(InvalidSpanError, match="min_improvement"):
        should_move(4, (0, 2), 1.0, [], 0.5)
    with pytest.raises(InvalidSpanError, match="my_span"):
        should_move(4, (2, 9), 1.0, [])
    with pytest.raises(InvalidSpanError, match="throughput"):
        should_move(4, (0, 2), -1.0, [])
