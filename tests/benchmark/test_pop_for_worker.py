"""The job a free verification worker takes next: one of a task it already holds, else the oldest."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from stepforge.benchmark.pool import _LOOK_AHEAD, pop_for_worker


def test_prefers_a_held_task_and_keeps_the_order_of_the_rest():
    pending = deque([(1, "a"), (2, "b"), (3, "a"), (4, "c")])
    assert pop_for_worker(pending, {"c"}, lambda j: j[1]) == (4, "c")
    assert pop_for_worker(pending, {"b"}, lambda j: j[1]) == (2, "b")
    assert pop_for_worker(pending, set(), lambda j: j[1]) == (1, "a")
    assert list(pending) == [(3, "a")]


def test_looks_only_so_far_ahead():
    pending = deque(["x"] * _LOOK_AHEAD + ["held"])
    assert pop_for_worker(pending, {"held"}, lambda j: j) == "x"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=20), st.sets(st.sampled_from("abcd")))
def test_takes_exactly_one_item(keys, known):
    pending = deque(enumerate(keys))
    got = pop_for_worker(pending, known, lambda j: j[1])
    assert sorted(list(pending) + [got]) == list(enumerate(keys))
    if any(k in known for k in keys):
        assert got[1] in known and got == next(j for j in enumerate(keys) if j[1] in known)
    else:
        assert got == (0, keys[0])
