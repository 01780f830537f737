"""The fn language's size rules agree with torch: the element count they predict is the result's."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepforge.simulator.fnlang_vocab import KNOWN, pointwise

shapes = st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None)
@given(st.lists(shapes, min_size=2, max_size=3))
def test_pointwise_size_is_the_broadcast(shape_list):
    tensors = tuple(torch.empty(s) for s in shape_list)
    try:
        want = torch.broadcast_shapes(*shape_list).numel()
    except RuntimeError:
        want = None
    assert pointwise(tensors, {}) == want


@settings(max_examples=300, deadline=None)
@given(shapes, shapes)
def test_matmul_size_is_the_product(a, b):
    ta, tb = torch.empty(a), torch.empty(b)
    try:
        want = torch.matmul(torch.empty(a, device="meta"), torch.empty(b, device="meta")).numel()
    except RuntimeError:
        want = None
    got = KNOWN["matmul"].size((ta, tb), {})
    assert got == want or (want is None and got is None), (a, b, got, want)
