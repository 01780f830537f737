"""Running sums and maxima without a step loop: recognised only where exact, equal to the step loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from program_gen import assert_same_streams, fn_table, run_both, stream

from stepforge.simulator.reductions import recognise, running_reduction


@pytest.mark.parametrize("source, terms", [
    ("return [state[0] + input[0]]", (("sum", 0),)),
    ("[state[0] + input[0]]", (("sum", 0),)),
    ("return [torch.maximum(state[0], input[0])]", (("max", 0),)),
    ("return [state[0] + input[1], torch.maximum(state[1], input[0])]", (("sum", 1), ("max", 0))),
])
def test_plain_running_reductions_are_recognised(source, terms):
    assert recognise(source) == terms


@pytest.mark.parametrize("source", [
    "return [state[1] + input[0]]",  # output 0 from state 1: a permutation, not a running reduction
    "return [input[0] + state[0]]",  # not matched (kept simple): the step loop handles it
    "return [state[0] + input[0] * 2]",
    "return [state[0] + input[1][..., None] * input[0]]",
    "return [torch.minimum(state[0], input[0])]",
    "x = input[0]\nreturn [state[0] + x]",
    "return [state[0] + input[0]]  # a comment",
    "return [state[0] - input[0]]",
    "return state[0] + input[0]",
    "",
])
def test_anything_else_is_left_to_the_step_loop(source):
    assert recognise(source) is None


def _step_loop(terms, state, inputs, keep_all):
    history = []
    for t in range(inputs[0].shape[1]):
        state = [s + inputs[j][:, t] if kind == "sum" else torch.maximum(s, inputs[j][:, t])
                 for (kind, j), s in zip(terms, state)]
        history.append(state)
    if keep_all:
        return [torch.stack([h[i] for h in history], 1) for i in range(len(state))]
    return state


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.sampled_from(["sum", "max"]), min_size=1, max_size=3),
       batch=st.integers(1, 5), steps=st.integers(1, 9), width=st.sampled_from([(), (1,), (3,)]),
       keep_all=st.booleans(), init=st.sampled_from([0.0, 1.0, -1.0, -math.inf]), seed=st.integers(0, 2**16))
def test_equal_to_the_step_loop(kinds, batch, steps, width, keep_all, init, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn((batch, steps) + width, generator=gen) * 10 for _ in kinds]
    state = [torch.full((batch,) + width, init) for _ in kinds]
    source = "return [" + ", ".join(f"state[{i}] + input[{i}]" if k == "sum" else f"torch.maximum(state[{i}], input[{i}])"
                                    for i, k in enumerate(kinds)) + "]"
    got = running_reduction(source, state, inputs, keep_all)
    want = _step_loop(recognise(source), state, inputs, keep_all)
    assert got is not None
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_shapes_that_would_broadcast_and_nans_fall_back():
    state = [torch.zeros(2, 3)]
    assert running_reduction("return [state[0] + input[0]]", state, [torch.ones(2, 4)], keep_all=True) is None
    nan = torch.tensor([[1.0, math.nan]])
    assert running_reduction("return [torch.maximum(state[0], input[0])]", [torch.zeros(1)], [nan], False) is None
    assert running_reduction("return [state[0] + input[1]]", [torch.zeros(1)], [torch.ones(1, 2)], False) is None


def test_a_long_numbering_scan_agrees_with_the_naive_engine():
    """The Scan that numbers every element (as the ALiBi and causal tasks do) is one cumsum."""
    binding = {"M": 3, "N": 40, "K": 2, "D": 1, "E": 1}
    fns = fn_table(binding, [("fn1", "fp32", "fp32", "return [state[0] + input[0]]", "-1")])
    program = "f = step.Flatten(L=[1, 2]).apply(E0)\nt = step.Promote(b=1).apply(f)\ns = step.Scan(fn=fn1, b=1).apply(t)\nreturn s\n"
    inputs = {"E0": stream("fp32", ["K", "N", "M"], torch.ones(3, 40, 2))}
    vec, nai = run_both(program, inputs, fns, binding)
    assert_same_streams(vec, nai, where="numbering scan")
    assert torch.equal(vec[0].data.flatten().sort().values, torch.arange(240, dtype=torch.float32))


def test_turned_off_with_the_other_shortcuts():
    from stepforge.simulator.batching import fast_batching

    with fast_batching(False):
        assert running_reduction("return [state[0] + input[0]]", [torch.zeros(1)], [torch.ones(1, 3)], False) is None
    assert torch.equal(running_reduction("return [state[0] + input[0]]", [torch.zeros(1)], [torch.ones(1, 3)], False)[0],
                       torch.tensor([3.0]))
