"""The experience buffer D: difficulty order, stratification into groups, demonstration sets, earning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepforge.loop.buffer import demonstration_sets, difficulty_order, earn, select_program, stratify
from stepforge.loop.interfaces import BufferEntry


def entry(key: str, rate: float, round_: int = 0) -> BufferEntry:
    return BufferEntry(task_key=key, impl="return E0\n", success_count=1, n_samples=4, success_rate=rate,
                       round=round_, temperature=0.4)


RATES = st.lists(st.tuples(st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0]), st.integers(0, 3)), max_size=12)


@given(RATES, st.integers(1, 6))
def test_stratify_is_a_partition_hardest_first_in_near_equal_groups(rates, m):
    entries = [entry(f"t{i}", r, k) for i, (r, k) in enumerate(rates)]
    groups = stratify(entries, m)
    assert [e for g in groups for e in g] == difficulty_order(entries)  # every entry once, hardest first
    assert len(groups) == min(m, len(entries)) and all(groups)
    sizes = [len(g) for g in groups]
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_difficulty_order_breaks_ties_by_round_then_key():
    entries = [entry("b", 0.5, 1), entry("a", 0.5, 1), entry("c", 0.5, 0), entry("d", 0.25, 2)]
    assert [e.task_key for e in difficulty_order(entries)] == ["d", "c", "a", "b"]
    with pytest.raises(ValueError, match="granularity"):
        stratify(entries, 0)


def test_demonstration_sets_are_cumulative_capped_and_skip_repeats():
    a, b, c = entry("a", 0.1), entry("b", 0.2), entry("c", 0.3)
    assert [[e.task_key for e in s] for s in demonstration_sets([[a], [b], [c]])] == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert [[e.task_key for e in s] for s in demonstration_sets([[a, b], [c]], cap=2)] == [["a", "b"]]
    assert demonstration_sets([]) == [[]]


def test_earn_keeps_the_shortest_correct_program_and_its_prompt():
    long = "a = step.Map(fn=f).apply(E0)\nb = step.Map(fn=f).apply(a)\nreturn b\n"
    short = "x = step.Map(fn=f).apply(E0)\nreturn x\n"
    renamed = "# same program\ny = step.Map(fn=f).apply(E0)\nreturn y\n"
    program, distinct = select_program([long, renamed, short])
    assert program == renamed and distinct == 2  # renamed and short are one program; the first of them is kept
    messages = [{"role": "user", "content": "task"}]
    got = earn("t", [(long, 0.4, None), (short, 1.0, messages)], n_samples=8, round_=2, step=1, demonstrations=["d"])
    assert (got.impl, got.temperature, got.messages) == (short, 1.0, messages)
    assert (got.success_count, got.n_samples, got.success_rate, got.round, got.step) == (2, 8, 0.25, 2, 1)
    with pytest.raises(ValueError, match="no correct sample"):
        earn("t", [], n_samples=8, round_=0)
