"""Every STeP operator on small hand-computed examples, in both engines.

Expected tensors are derived from docs/language.md section 4 and its layout rule:
a stream of dims [d0, ..., dr] (innermost first) is the tensor
(dr, ..., d0) followed by the element's axes, a Buffer [b0, b1] element is
the tensor (b1, b0).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from program_gen import fn_table, run, stream

from stepforge.simulator import (
    BufferType,
    MultihotType,
    ScalarType,
    StepRuntimeError,
    TupleType,
    batching,
    parse_dims,
    parse_dtype,
)
from stepforge.simulator import fns as fns_module
from stepforge.simulator.shapes import Dim

ENGINES = ["vectorised", "naive"]
B = {"M": 2, "N": 2, "K": 3, "D": 2, "E": 3}

FNS = [
    ("times2p1", "fp32", "fp32", "[input[0] * 2.0 + 1.0]"),
    ("scale_buf", ["fp32", "Buffer(fp32, [D])"], "Buffer(fp32, [D])", "[input[0] * input[1]]"),
    ("branch", "fp32", "fp32", "if input[0] > 0:\n    return [input[0] * 10.0]\nreturn [input[0] - 1.0]"),
    ("minus_first", "Buffer(fp32, [D])", "Buffer(fp32, [D])", "[input[0] - input[0][0]]"),
    ("plus_first_of_second", ["fp32", "Buffer(fp32, [D])"], "fp32", "[input[0] + input[1][0]]"),
    ("split", "fp32", ["fp32", "fp32"], "[input[0] + 1.0, input[0] * input[0]]"),
    ("row0", "Buffer(fp32, [D, K])", "Buffer(fp32, [D])", "[input[0][0]]"),
    ("add", "fp32", "fp32", "[state[0] + input[0]]", 0),
    ("digits", "fp32", "fp32", "[state[0] * 10.0 + input[0]]", 0),
    ("maxf", "fp32", "fp32", "[torch.maximum(state[0], input[0])]", "-inf"),
    ("online", "fp32", ["fp32", "fp32"],
     "m = torch.maximum(state[0], input[0])\nreturn [m, state[1] * torch.exp(state[0] - m) + torch.exp(input[0] - m)]",
     ["-inf", 0]),
    ("branch_fold", "fp32", "fp32", "if input[0] > 2:\n    return [state[0] + input[0]]\nreturn [state[0] * 2.0]", 1),
    ("x10", "fp32", "fp32", "[input[0] * 10.0]"),
    ("x100", "fp32", "fp32", "[input[0] * 100.0]"),
    ("p1", "fp32", "fp32", "[input[0] + 1.0]"),
    ("rowsum", "Buffer(fp32, [K])", "fp32", "[input[0].sum()]"),
]


def fns_for(binding):
    return fn_table(binding, FNS)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def ex(text, inputs, engine, binding=B):
    return run(text, inputs, fns_for(binding), dict(binding), engine)


def one(text, inputs, engine, binding=B):
    out = ex(text, inputs, engine, binding)
    assert len(out) == 1
    return out[0]


# ---------------------------------------------------------------------------
# Map


@pytest.mark.parametrize("engine", ENGINES)
def test_map_scalar(engine):
    x = t([[1, 2, 3], [4, 5, 6]])  # dims [K, M]: tensor (M, K)
    out = one("y = step.Map(fn=times2p1).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert out.type.elem == ScalarType() and out.type.shape == parse_dims(["K", "M"])
    assert torch.equal(out.data, t([[3, 5, 7], [9, 11, 13]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_map_over_tuple_of_streams(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    y = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # Buffer [D], dims [K, M]: (M, K, D)
    out = one("z = step.Map(fn=scale_buf).apply((E0, E1))\nreturn z",
              {"E0": stream("fp32", ["K", "M"], x), "E1": stream("Buffer(fp32, [D])", ["K", "M"], y)}, engine)
    assert out.type.elem == parse_dtype("Buffer(fp32, [D])")
    assert torch.equal(out.data, x[..., None] * y)
    assert out.data[1, 2, 1] == 6 * 11


@pytest.mark.parametrize("engine", ENGINES)
def test_map_value_dependent_branch(engine):
    x = t([[-1, 2, 0], [3, -4, 0.5]])
    out = one("y = step.Map(fn=branch).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert torch.equal(out.data, t([[-2, 20, -1], [30, -5, 5]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_map_indexing_its_element(engine):
    y = t([[[1, 5], [2, 7], [3, 3]], [[0, 1], [9, 4], [6, 6]]])  # (M, K, D)
    out = one("z = step.Map(fn=minus_first).apply(E1)\nreturn z",
              {"E1": stream("Buffer(fp32, [D])", ["K", "M"], y)}, engine)
    assert torch.equal(out.data, t([[[0, 4], [0, 5], [0, 0]], [[0, 1], [0, -5], [0, 0]]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_map_indexing_second_field(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    y = t([[[1, 5], [2, 7], [3, 3]], [[0, 1], [9, 4], [6, 6]]])
    out = one("z = step.Map(fn=plus_first_of_second).apply((E0, E1))\nreturn z",
              {"E0": stream("fp32", ["K", "M"], x), "E1": stream("Buffer(fp32, [D])", ["K", "M"], y)}, engine)
    assert torch.equal(out.data, t([[2, 4, 6], [4, 14, 12]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_map_with_tuple_output(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    out = one("y = step.Map(fn=split).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert out.type.elem == TupleType((ScalarType(), ScalarType()))
    assert isinstance(out.data, list) and len(out.data) == 2
    assert torch.equal(out.data[0], x + 1) and torch.equal(out.data[1], x * x)


@pytest.mark.parametrize("engine", ENGINES)
def test_map_over_buffer_of_buffer_element_layout(engine):
    # Buffer(fp32, [D, K]): one element is the tensor (K, D); input[0][0] is its first row (k = 0)
    y = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # dims [M]: (M, K, D)
    out = one("z = step.Map(fn=row0).apply(E0)\nreturn z", {"E0": stream("Buffer(fp32, [D, K])", ["M"], y)}, engine)
    assert torch.equal(out.data, t([[0, 1], [6, 7]]))


# ---------------------------------------------------------------------------
# Zip


@pytest.mark.parametrize("engine", ENGINES)
def test_zip_makes_flat_tuple(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    y = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    w = -x
    out = ex("a = step.Zip().apply((E0, E1))\nb = step.Zip().apply((a, E2))\nreturn a, b",
             {"E0": stream("fp32", ["K", "M"], x), "E1": stream("Buffer(fp32, [D])", ["K", "M"], y),
              "E2": stream("fp32", ["K", "M"], w)}, engine)
    a, b = out
    assert a.type.elem == parse_dtype(["fp32", "Buffer(fp32, [D])"])
    assert b.type.elem == parse_dtype(["fp32", "Buffer(fp32, [D])", "fp32"])
    assert len(b.type.elem.items) == 3  # flattened, not nested
    assert torch.equal(a.data[0], x) and torch.equal(a.data[1], y)
    assert [torch.equal(p, q) for p, q in zip(b.data, [x, y, w])] == [True] * 3


# ---------------------------------------------------------------------------
# Accum and Scan


@pytest.mark.parametrize("engine", ENGINES)
def test_accum_b1_sum(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    out = one("y = step.Accum(fn=add, b=1).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert out.type.shape == parse_dims(["M"])
    assert torch.equal(out.data, t([6, 15]))


@pytest.mark.parametrize("engine", ENGINES)
def test_accum_order_is_innermost_fastest(engine):
    # digits: state*10 + x; the fold order shows in the result
    x = t([[1, 2, 3], [4, 5, 6]])
    out = one("y = step.Accum(fn=digits, b=1).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert torch.equal(out.data, t([123, 456]))


@pytest.mark.parametrize("engine", ENGINES)
def test_accum_b2(engine):
    # dims [K, N, M] with M=2, N=2, K=2: tensor (M, N, K); b=2 folds N and K, K fastest
    b = dict(B, K=2)
    x = t([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    out = one("y = step.Accum(fn=digits, b=2).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "N", "M"], x)},
              engine, b)
    assert out.type.shape == parse_dims(["M"])
    assert torch.equal(out.data, t([1234, 5678]))


@pytest.mark.parametrize("engine", ENGINES)
def test_scan_b1_and_b2(engine):
    b = dict(B, K=2)
    x = t([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    s1, s2 = ex("a, c = step.Copy().apply(E0)\ny = step.Scan(fn=digits, b=1).apply(a)\n"
                "z = step.Scan(fn=digits, b=2).apply(c)\nreturn y, z",
                {"E0": stream("fp32", ["K", "N", "M"], x)}, engine, b)
    assert s1.type.shape == s2.type.shape == parse_dims(["K", "N", "M"])
    assert torch.equal(s1.data, t([[[1, 12], [3, 34]], [[5, 56], [7, 78]]]))
    assert torch.equal(s2.data, t([[[1, 12], [123, 1234]], [[5, 56], [567, 5678]]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_accum_max_from_minus_inf_and_tuple_state(engine):
    x = t([[1, -2, 3], [-4, -5, -6]])
    mx, on = ex("a, c = step.Copy().apply(E0)\ny = step.Accum(fn=maxf, b=1).apply(a)\n"
                "z = step.Accum(fn=online, b=1).apply(c)\nreturn y, z",
                {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert torch.equal(mx.data, t([3, -4]))
    assert on.type.elem == TupleType((ScalarType(), ScalarType()))
    assert torch.equal(on.data[0], t([3, -4]))
    expected = [sum(math.exp(v - 3) for v in (1, -2, 3)), sum(math.exp(v + 4) for v in (-4, -5, -6))]
    assert torch.allclose(on.data[1], t(expected))


@pytest.mark.parametrize("engine", ENGINES)
def test_scan_with_branching_fold(engine):
    # init 1; x > 2 adds, else doubles
    x = t([[1, 3, 2], [5, 0, 4]])
    out = one("y = step.Scan(fn=branch_fold, b=1).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert torch.equal(out.data, t([[2, 5, 10], [6, 12, 16]]))


# ---------------------------------------------------------------------------
# Copy, Bufferize, Streamify


@pytest.mark.parametrize("engine", ENGINES)
def test_copy(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    a, c = ex("a, c = step.Copy().apply(E0)\nreturn a, c", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert a.type == c.type
    assert torch.equal(a.data, x) and torch.equal(c.data, x)


@pytest.mark.parametrize("engine", ENGINES)
def test_bufferize_keeps_data_changes_type(engine):
    b = dict(B, K=2)
    x = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)  # dims [K, N, M]: (M, N, K)
    y1, y2 = ex("a, c = step.Copy().apply(E0)\ny = step.Bufferize(a=1).apply(a)\nz = step.Bufferize(a=2).apply(c)\n"
                "return y, z", {"E0": stream("fp32", ["K", "N", "M"], x)}, engine, b)
    assert y1.type.elem == parse_dtype("Buffer(fp32, [K])") and y1.type.shape == parse_dims(["N", "M"])
    assert y2.type.elem == parse_dtype("Buffer(fp32, [K, N])") and y2.type.shape == parse_dims(["M"])
    assert torch.equal(y1.data, x) and torch.equal(y2.data, x)


@pytest.mark.parametrize("engine", ENGINES)
def test_bufferize_of_buffer_flattens(engine):
    y = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # Buffer [D], dims [K, M]: (M, K, D)
    out = one("z = step.Bufferize(a=1).apply(E1)\nreturn z", {"E1": stream("Buffer(fp32, [D])", ["K", "M"], y)}, engine)
    assert out.type.elem == BufferType(ScalarType(), (Dim.sym("D"), Dim.sym("K")))  # Buffer(U, B + s[:k])
    assert out.type.shape == parse_dims(["M"])
    assert torch.equal(out.data, y)  # an element is (K, D)


@pytest.mark.parametrize("engine", ENGINES)
def test_bufferize_of_multihot(engine):
    idx = t([[[1, 0, 0], [0, 1, 1]], [[0, 0, 0], [1, 1, 1]]])  # Multihot(E) dims [N, M]: (M, N, E)
    out = one("z = step.Bufferize(a=1).apply(E0)\nreturn z", {"E0": stream("Multihot(fp32, E)", ["N", "M"], idx)}, engine)
    assert out.type.elem == BufferType(MultihotType("fp32", Dim.sym("E")), (Dim.sym("N"),))
    assert torch.equal(out.data, idx)


@pytest.mark.parametrize("engine", ENGINES)
def test_streamify_inverts_bufferize(engine):
    y = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # Buffer [D, K] dims [M]: (M, K, D)
    out = one("z = step.Streamify().apply(E0)\nreturn z", {"E0": stream("Buffer(fp32, [D, K])", ["M"], y)}, engine)
    assert out.type.elem == ScalarType() and out.type.shape == parse_dims(["D", "K", "M"])
    assert torch.equal(out.data, y)
    back = one("s = step.Streamify().apply(E0)\nz = step.Bufferize(a=2).apply(s)\nreturn z",
               {"E0": stream("Buffer(fp32, [D, K])", ["M"], y)}, engine)
    assert back.type.elem == parse_dtype("Buffer(fp32, [D, K])") and torch.equal(back.data, y)


# ---------------------------------------------------------------------------
# Promote, Repeat, RepeatRef


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k, dims, view", [
    (0, ["1", "K", "M"], (2, 3, 1)),
    (1, ["K", "1", "M"], (2, 1, 3)),
    (2, ["K", "M", "1"], (1, 2, 3)),
])
def test_promote(engine, k, dims, view):
    x = t([[1, 2, 3], [4, 5, 6]])
    out = one(f"y = step.Promote(b={k}).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert out.type.shape == parse_dims([int(d) if d.isdigit() else d for d in dims])
    assert out.data.shape == view and torch.equal(out.data.reshape(2, 3), x)


@pytest.mark.parametrize("engine", ENGINES)
def test_repeat_adds_innermost_dim(engine):
    x = t([[1, 2, 3], [4, 5, 6]])
    out = one("y = step.Repeat(n=N).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine)
    assert out.type.shape == parse_dims(["N", "K", "M"])
    assert torch.equal(out.data, t([[[1, 1], [2, 2], [3, 3]], [[4, 4], [5, 5], [6, 6]]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_repeat_buffer_elements_and_product_size(engine):
    y = t([[1, 2], [3, 4]])  # Buffer [D] dims [M]: (M, D)
    out = one("z = step.Repeat(n=K*N).apply(E0)\nreturn z", {"E0": stream("Buffer(fp32, [D])", ["M"], y)}, engine)
    assert out.type.shape == parse_dims(["K*N", "M"])
    assert out.data.shape == (2, 6, 2)
    assert torch.equal(out.data, y[:, None, :].expand(2, 6, 2))


@pytest.mark.parametrize("engine", ENGINES)
def test_repeatref(engine):
    x = t([7, 8])  # fp32 [M]
    ref = torch.zeros(2, 3, 2)  # Buffer [D] dims [K, M]: only its shape matters
    out = one("y = step.RepeatRef().apply((E0, E1))\nreturn y",
              {"E0": stream("fp32", ["M"], x), "E1": stream("Buffer(fp32, [D])", ["K", "M"], ref)}, engine)
    assert out.type.elem == ScalarType() and out.type.shape == parse_dims(["K", "M"])
    assert torch.equal(out.data, t([[7, 7, 7], [8, 8, 8]]))


# ---------------------------------------------------------------------------
# Flatten and Reshape (layout: a reshape of the tensor, innermost fastest)


@pytest.mark.parametrize("engine", ENGINES)
def test_flatten_levels(engine):
    b = {"M": 2, "N": 2, "K": 3, "D": 1, "E": 1}
    x = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)  # dims [K, N, M]: (M, N, K), x[m,n,k] = 6m+3n+k
    src = {"E0": stream("fp32", ["K", "N", "M"], x)}
    f1 = one("y = step.Flatten(L=[1]).apply(E0)\nreturn y", dict(src), engine, b)
    assert f1.type.shape == parse_dims(["K*N", "M"])
    # merged position j = n*K + k holds x[m, n, k]
    assert torch.equal(f1.data, t([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]))
    f2 = one("y = step.Flatten(L=[2]).apply(E0)\nreturn y", dict(src), engine, b)
    assert f2.type.shape == parse_dims(["K", "N*M"])
    assert torch.equal(f2.data, t([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]))  # j = m*N + n
    f12 = one("y = step.Flatten(L=[1, 2]).apply(E0)\nreturn y", dict(src), engine, b)
    assert f12.type.shape == parse_dims(["K*N*M"])
    assert torch.equal(f12.data, torch.arange(12, dtype=torch.float32))


@pytest.mark.parametrize("engine", ENGINES)
def test_flatten_keeps_buffer_axes(engine):
    b = {"M": 2, "N": 2, "K": 2, "D": 2, "E": 1}
    y = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)  # Buffer [D] dims [K, M]: (M, K, D)
    out = one("z = step.Flatten(L=[1]).apply(E0)\nreturn z", {"E0": stream("Buffer(fp32, [D])", ["K", "M"], y)}, engine, b)
    assert out.type.shape == parse_dims(["K*M"]) and out.type.elem == parse_dtype("Buffer(fp32, [D])")
    assert torch.equal(out.data, t([[0, 1], [2, 3], [4, 5], [6, 7]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_reshape_innermost_dim(engine):
    b = {"M": 2, "N": 1, "K": 4, "D": 1, "E": 1}
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)  # dims [K, M]
    out = one("y = step.Reshape(L=[0], S=2).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine, b)
    # [K] -> [2, K/2]: the inner chunk of 2 is the new innermost dim
    assert out.type.shape == (Dim.const(2), Dim.sym("K") / 2, Dim.sym("M"))
    assert torch.equal(out.data, t([[[0, 1], [2, 3]], [[4, 5], [6, 7]]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_reshape_outer_dim_by_symbol(engine):
    b = {"M": 4, "N": 2, "K": 1, "D": 1, "E": 1}
    x = t([10, 11, 12, 13])  # fp32 [M]
    out = one("y = step.Reshape(L=[0], S=N).apply(E0)\nreturn y", {"E0": stream("fp32", ["M"], x)}, engine, b)
    assert out.type.shape == (Dim.sym("N"), Dim.sym("M") / Dim.sym("N"))
    assert torch.equal(out.data, t([[10, 11], [12, 13]]))  # m = chunk*N + i


@pytest.mark.parametrize("engine", ENGINES)
def test_reshape_two_dims(engine):
    b = {"M": 4, "N": 1, "K": 2, "D": 1, "E": 1}
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2)  # dims [K, M]: (M, K)
    out = one("y = step.Reshape(L=[0, 1], S=2).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], x)}, engine, b)
    two = Dim.const(2)
    assert out.type.shape == (two, Dim.sym("K") / 2, two, Dim.sym("M") / 2)
    # tensor (M/2, 2, K/2, 2): element [mo, mi, ko, ki] is x[mo*2 + mi, ko*2 + ki]
    assert out.data.shape == (2, 2, 1, 2)
    assert torch.equal(out.data, x.reshape(2, 2, 1, 2))
    assert out.data[1, 0, 0, 1] == x[2, 1]


@pytest.mark.parametrize("engine", ENGINES)
def test_reshape_not_dividing_is_a_runtime_error(engine):
    b = {"M": 2, "N": 1, "K": 3, "D": 1, "E": 1}
    with pytest.raises(StepRuntimeError) as err:
        one("y = step.Reshape(L=[0], S=2).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], torch.zeros(2, 3))},
            engine, b)
    assert "K/2" in err.value.message and "line 1" in err.value.message


# ---------------------------------------------------------------------------
# Partition and Merge

IDX = t([[1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1]])  # 4 tokens, 3 routes; route 1 empty, token 1 unrouted
BR = {"M": 4, "N": 2, "K": 3, "D": 2, "E": 3}


@pytest.mark.parametrize("engine", ENGINES)
def test_partition_with_empty_route(engine):
    x = t([1, 2, 3, 4])
    r0, r1, r2 = ex("a, b, c = step.Partition(N=E).apply((E0, E1))\nreturn a, b, c",
                    {"E0": stream("fp32", ["M"], x), "E1": stream("Multihot(fp32, E)", ["M"], IDX)}, engine, BR)
    assert torch.equal(r0.data, t([1, 3])) and torch.equal(r2.data, t([3, 4]))
    assert r1.data.shape == (0,)
    for r in (r0, r1, r2):
        assert r.type.elem == ScalarType() and len(r.type.shape) == 1
    # each route gets its own dynamic size symbol
    assert len({r.type.shape[0] for r in (r0, r1, r2)}) == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_partition_keeps_inner_dims(engine):
    y = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)  # Buffer [D] dims [K, M]: (M, K, D)
    r0, r1, r2 = ex("a, b, c = step.Partition(N=E_value).apply((E0, E1))\nreturn a, b, c",
                    {"E0": stream("Buffer(fp32, [D])", ["K", "M"], y), "E1": stream("Multihot(fp32, E)", ["M"], IDX)},
                    engine, BR)
    assert r0.type.shape[0] == Dim.sym("K") and len(r0.type.shape) == 2
    assert torch.equal(r0.data, y[[0, 2]]) and torch.equal(r2.data, y[[2, 3]])
    assert r1.data.shape == (0, 3, 2)


MERGE_PROG = """i1, i2 = step.Copy().apply(E1)
parts = step.Partition(N=E).apply((E0, i1))
fs = [x10, x100, p1]
outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, fs)]
y = step.Merge(fn={merge}).apply((outs, i2))
return y"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("merge, expected", [
    # route 0: 10*[1, 3] = [10, 30]; route 2: [3, 4] + 1 = [4, 5]; token 1 has no route
    ("add", [10, 0, 34, 5]),
    ("maxf", [10, 0, 30, 5]),  # init -inf, but an unrouted position stays zero
    ("digits", [10, 0, 304, 5]),  # route order: (0*10 + 30)*10 + 4
])
def test_partition_map_merge(engine, merge, expected):
    x = t([1, 2, 3, 4])
    out = one(MERGE_PROG.format(merge=merge),
              {"E0": stream("fp32", ["M"], x), "E1": stream("Multihot(fp32, E)", ["M"], IDX)}, engine, BR)
    assert out.type.shape == parse_dims(["M"]) and out.type.elem == ScalarType()
    assert torch.equal(out.data, t(expected))


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_with_inner_dims_and_reduction(engine):
    # tokens carry a row of K values; experts reduce the row; Merge folds per token
    y = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # Buffer [K] dims [M]
    prog = """i1, i2 = step.Copy().apply(E1)
parts = step.Partition(N=E).apply((E0, i1))
outs = [step.Map(fn=rowsum).apply(p) for p in parts]
y = step.Merge(fn=add).apply((outs, i2))
return y"""
    out = one(prog, {"E0": stream("Buffer(fp32, [K])", ["M"], y), "E1": stream("Multihot(fp32, E)", ["M"], IDX)},
              engine, BR)
    sums = y.sum(1)
    assert torch.equal(out.data, t([sums[0], 0, 2 * sums[2], sums[3]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_over_stream_dims(engine):
    # data fp32 [K, M] routed per token (q = 1): each route is [K, n_i]; Merge rebuilds [K, M]
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    prog = """i1, i2 = step.Copy().apply(E1)
parts = step.Partition(N=E).apply((E0, i1))
y = step.Merge(fn=maxf).apply((parts, i2))
return y"""
    out = one(prog, {"E0": stream("fp32", ["K", "M"], x), "E1": stream("Multihot(fp32, E)", ["M"], IDX)}, engine, BR)
    assert out.type.shape == parse_dims(["K", "M"])
    expected = x.clone()
    expected[1] = 0
    assert torch.equal(out.data, expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_with_no_bits_at_all(engine):
    x = t([1, 2, 3, 4])
    out = one(MERGE_PROG.format(merge="maxf"),
              {"E0": stream("fp32", ["M"], x), "E1": stream("Multihot(fp32, E)", ["M"], torch.zeros(4, 3))}, engine, BR)
    assert torch.equal(out.data, torch.zeros(4))


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_route_count_mismatch_is_a_runtime_error(engine):
    # Merge gets an idx that selects route 0 three times, but route 0 carries 2 elements
    other = t([[1, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]])
    prog = """parts = step.Partition(N=E).apply((E0, E1))
y = step.Merge(fn=add).apply((parts, E2))
return y"""
    with pytest.raises(StepRuntimeError) as err:
        one(prog, {"E0": stream("fp32", ["M"], t([1, 2, 3, 4])), "E1": stream("Multihot(fp32, E)", ["M"], IDX),
                   "E2": stream("Multihot(fp32, E)", ["M"], other)}, engine, BR)
    assert "line 2" in err.value.message and "Merge(fn=add)" in err.value.message and "route 0" in err.value.message


# ---------------------------------------------------------------------------
# fn bodies: shapes and in-place updates (regressions)


@pytest.mark.parametrize("engine", ENGINES)
def test_fn_output_of_wrong_shape_is_an_error_even_when_batch_matches(engine):
    # Regression: the vectorised engine used to broadcast an output that lacked the batch axis
    # when it happened to equal the element shape (here: K elements, Buffer [K] output).
    b = {"M": 1, "N": 1, "K": 3, "D": 1, "E": 1}
    fns = fn_table(b, [("bad", "fp32", "Buffer(fp32, [K])", "[input[0] * 2.0]")])
    with pytest.raises(StepRuntimeError) as err:
        run("y = step.Map(fn=bad).apply(E0)\nreturn y", {"E0": stream("fp32", ["K"], t([1, 2, 3]))}, fns, b, engine)
    assert "fn bad returned a tensor of shape ()" in err.value.message and "needs (3,)" in err.value.message


@pytest.mark.parametrize("engine", ENGINES)
def test_fn_output_with_extra_axis_is_an_error(engine):
    # Regression: the naive engine used to reshape a (1,) output into a scalar silently.
    fns = fn_table(B, [("bad", "fp32", "fp32", "[input[0].reshape(1)]")])
    with pytest.raises(StepRuntimeError) as err:
        run("y = step.Map(fn=bad).apply(E0)\nreturn y", {"E0": stream("fp32", ["K"], t([1, 2, 3]))}, fns, B, engine)
    assert "shape (1,)" in err.value.message and "needs ()" in err.value.message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("op, body", [
    ("Scan(fn=bad, b=1)", "state[0] += input[0]\nreturn [state[0]]"),
    ("Accum(fn=bad, b=1)", "state[0].add_(input[0])\nreturn [state[0] * 1.0]"),
])
def test_in_place_fold_is_an_error(engine, op, body):
    # Regression: an in-place fold made every emitted Scan state alias the last one, in both engines.
    fns = fn_table(B, [("bad", "fp32", "fp32", body, 0)])
    with pytest.raises(StepRuntimeError) as err:
        run(f"y = step.{op}.apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], torch.ones(2, 3))}, fns, B, engine)
    assert "modified its input or state in place" in err.value.message


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_map_is_an_error_and_copy_stays_intact_otherwise(engine):
    fns = fn_table(B, [("bad", "fp32", "fp32", "input[0].mul_(2.0)\nreturn [input[0] + 0.0]"),
                       ("good", "fp32", "fp32", "y = input[0] * 1.0\ny.mul_(2.0)\nreturn [y]")])
    x = t([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(StepRuntimeError):
        run("a, b = step.Copy().apply(E0)\ny = step.Map(fn=bad).apply(a)\nreturn y, b",
            {"E0": stream("fp32", ["K", "M"], x.clone())}, fns, B, engine)
    y, c = run("a, b = step.Copy().apply(E0)\ny = step.Map(fn=good).apply(a)\nreturn y, b",
               {"E0": stream("fp32", ["K", "M"], x.clone())}, fns, B, engine)
    assert torch.equal(y.data, 2 * x) and torch.equal(c.data, x)


def test_vmap_failing_after_success_falls_back_to_elements():
    # A body that vmaps on one call and not on a later one must still give element-wise
    # results (regression: the vectorised path re-raised the raw vmap error).
    fns = fn_table(B, [("f", "fp32", "fp32", "[input[0] * 2.0]")])
    f = fns["f"]
    assert torch.equal(f.map([t([1, 2])], B)[0], t([2, 4]))
    assert f._vmappable is True
    real = f.body

    def refuses_vmap(inputs, state):
        if torch._C._functorch.is_batchedtensor(inputs[0]):
            raise RuntimeError("not under vmap")
        return real(inputs, state)

    f.body = refuses_vmap
    assert torch.equal(f.map([t([3, 4])], B)[0], t([6, 8]))


# ---------------------------------------------------------------------------
# the vectorised fold runs its step loop inside one vmap (fold_steps), with the step-by-step path as fallback


def test_vectorised_fold_uses_one_vmap_per_fold(monkeypatch):
    from stepforge.simulator import StepFn, batching

    calls, vmaps = [], []
    real_fold, real_vmap = StepFn.fold, batching.vmap
    monkeypatch.setattr(StepFn, "fold", lambda self, *a, **k: calls.append(self.func_name) or real_fold(self, *a, **k))
    monkeypatch.setattr(fns_module, "vmap", lambda f, args: vmaps.append(len(args)) or real_vmap(f, args))
    x = t([[1, 2, 3], [4, 5, 6]])
    src = lambda: {"E0": stream("fp32", ["K", "M"], x.clone())}
    no_direct = {name: dataclasses.replace(f, batch_direct=False) for name, f in fns_for(B).items()}
    (acc,) = run("y = step.Accum(fn=digits, b=1).apply(E0)\nreturn y", src(), no_direct, dict(B), "vectorised")
    (scan,) = run("y = step.Scan(fn=online, b=1).apply(E0)\nreturn y", src(), no_direct, dict(B), "vectorised")
    assert torch.equal(acc.data, t([123, 456]))
    assert torch.equal(scan.data[0], t([[1, 2, 3], [4, 5, 6]]))
    assert calls == [] and len(vmaps) == 2  # no step-by-step fold: one vmap each
    # a body that batches by itself: after one trial (a vmap on random inputs), no vmap at all
    fns = fns_for(B)
    for _ in range(2):
        (acc,) = run("y = step.Accum(fn=digits, b=1).apply(E0)\nreturn y", src(), fns, dict(B), "vectorised")
        assert torch.equal(acc.data, t([123, 456]))
    assert calls == [] and len(vmaps) == 3
    # a body that branches on its value cannot vmap: the fold goes step by step, element by element
    (br,) = ex("y = step.Scan(fn=branch_fold, b=1).apply(E0)\nreturn y",
               {"E0": stream("fp32", ["K", "M"], t([[1, 3, 2], [5, 0, 4]]))}, "vectorised")
    assert torch.equal(br.data, t([[2, 5, 10], [6, 12, 16]]))
    assert calls == ["branch_fold"] * 3


@pytest.mark.parametrize("engine", ENGINES)
def test_fold_output_of_wrong_shape_is_reported(engine):
    fns = fn_table(B, [("bad", "fp32", "fp32", "[state[0] + input[0].reshape(1)]", 0)])
    with pytest.raises(StepRuntimeError) as err:
        run("y = step.Accum(fn=bad, b=1).apply(E0)\nreturn y", {"E0": stream("fp32", ["K", "M"], torch.ones(2, 3))},
            fns, B, engine)
    assert "line 1: Accum(fn=bad, b=1): fn bad returned a tensor of shape (1,)" in err.value.message
    assert "needs ()" in err.value.message


def test_bodies_that_batch_by_themselves_skip_vmap_and_others_keep_it():
    fns = fns_for(B)
    x, row = torch.randn(6), torch.randn(6, 2)
    expected = {"times2p1": [x * 2.0 + 1.0], "scale_buf": [x[:, None] * row],
                "minus_first": [row - row[:, :1]], "rowsum": [row.sum(-1)]}
    args = {"times2p1": [x], "scale_buf": [x, row], "minus_first": [row], "rowsum": [row]}
    layouts = {}
    for name, want in expected.items():
        f = fns[name]
        for _ in range(2):  # the first call makes the trial, the second uses its decision
            got = f.map([a.clone() for a in args[name]], B)
            assert all(torch.allclose(g, w) for g, w in zip(got, want)), name
        layouts[name] = set(f._direct.values())
    # elementwise: plain; a scalar times a Buffer: aligned; a body mixing batch rows: vmap
    assert layouts == {"times2p1": {"plain"}, "scale_buf": {"aligned"}, "minus_first": {None}, "rowsum": {None}}
    with batching.fast_batching(False):
        assert not fns_for(B)["times2p1"]._batches_itself([x], None)
