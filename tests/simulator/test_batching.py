"""Bodies that batch by themselves: the shortcut must never mix rows of a batch."""

from __future__ import annotations

import torch
from program_gen import assert_same_streams, fn_table, run_both, stream

SCAN_WITH_BATCH_SUM = "s2 = step.Scan(fn=fn1, b=1).apply(E0)\nreturn s2\n"


def test_a_body_that_reduces_over_the_batch_keeps_vmap():
    """`maximum(state, x + y.sum())` agrees with vmap on random data whenever `state` dominates;
    it must still be evaluated row by row (found by the differential test)."""
    binding = {"M": 2, "N": 4, "K": 3, "D": 1, "E": 1}
    fns = fn_table(binding, [("fn1", ["fp32", "Buffer(fp32, [M])"], "fp32",
                              "[torch.maximum(state[0], input[0] + input[1].sum())]", "-inf")])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen)
    y = torch.randn(4, 3, 2, generator=gen)
    y[1:] += 10.0  # rows 1..3 far from row 0: a batch-wide sum changes row 0's result
    inputs = {"E0": stream(["fp32", "Buffer(fp32, [M])"], ["K", "N"], [x, y])}
    vec, nai = run_both(SCAN_WITH_BATCH_SUM, inputs, fns, binding)
    assert_same_streams(vec, nai, where="scan with a batch-wide sum")
    expected = torch.cummax(x + y.sum(dim=-1), dim=1).values
    assert torch.allclose(vec[0].data, expected)
