"""Every typing rule raises StepTypeError with a one-line message naming the line,
the operator and what was expected versus what was given; the resource check
raises ResourceError before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from program_gen import fn_table, stream

from stepforge.simulator import (
    ResourceError,
    StepFn,
    StepTypeError,
    StreamType,
    parse_dims,
    parse_dtype,
    parse_program,
    run_program,
    typecheck,
)
from stepforge.simulator.naive import NaiveEngine
from stepforge.simulator.vectorised import VectorisedEngine

B = {"M": 2, "N": 3, "K": 4, "D": 2, "E": 3}

FNS = [
    ("f_s", "fp32", "fp32", "[input[0] + 1.0]"),
    ("f_b", "Buffer(fp32, [D])", "Buffer(fp32, [D])", "[input[0] * 2.0]"),
    ("to_b", "fp32", "Buffer(fp32, [D])", "[input[0] * torch.ones(D_value)]"),
    ("sum_s", "fp32", "fp32", "[state[0] + input[0]]", 0),
    ("sum_b", "Buffer(fp32, [D])", "Buffer(fp32, [D])", "[state[0] + input[0]]", 0),
    ("pair", ["fp32", "Buffer(fp32, [D])"], "fp32", "[input[0] + input[1].sum()]"),
]

TYPES = {
    "E0": ("fp32", ["K", "M"]),
    "E1": ("Buffer(fp32, [D])", ["K", "M"]),
    "E2": ("fp32", ["N", "M"]),
    "E3": ("Multihot(fp32, E)", ["M"]),
    "E4": ("fp32", ["M"]),
    "E5": ("fp32", ["K", "N", "M"]),
    "E6": ("Multihot(fp32, E)", ["K", "M"]),
    "E7": ("Multihot(fp32, E)", ["K"]),
    "E8": ("Multihot(fp32, 2)", ["M"]),
}


def input_types():
    return {n: StreamType(parse_dtype(d), parse_dims(s)) for n, (d, s) in TYPES.items()}


def fns():
    return fn_table(B, FNS)


PARTS = "parts = step.Partition(N=E).apply((E4, E3))\n"

# (id, program, line, operator label, expected fragments)
CASES = [
    ("map_fn_input", "y = step.Map(fn=f_s).apply(E1)\nreturn y", 1, "Map(fn=f_s)",
     ["fn f_s takes fp32", "elements of type Buffer(fp32, [D])"]),
    ("map_fn_input_tuple", "y = step.Map(fn=pair).apply((E1, E0))\nreturn y", 1, "Map(fn=pair)",
     ["takes [fp32, Buffer(fp32, [D])]", "[Buffer(fp32, [D]), fp32]"]),
    ("map_tuple_shapes", "y = step.Map(fn=pair).apply((E2, E1))\nreturn y", 1, "Map(fn=pair)",
     ["equal shapes", "[N, M]", "[K, M]"]),
    ("zip_shapes", "y = step.Zip().apply((E0, E2))\nreturn y", 1, "Zip()", ["equal shapes", "[K, M]", "[N, M]"]),
    ("zip_rank", "y = step.Zip().apply((E0, E4))\nreturn y", 1, "Zip()", ["equal shapes", "[K, M]", "[M]"]),
    ("zip_one_stream", "y = step.Zip().apply(E0)\nreturn y", 1, "Zip()", ["a tuple of at least two streams", "a stream fp32 [K, M]"]),
    ("accum_b_high", "y = step.Accum(fn=sum_s, b=2).apply(E0)\nreturn y", 1, "Accum(fn=sum_s, b=2)",
     ["1 <= b <= 1", "rank-1 stream [K, M]", "got 2"]),
    ("accum_b_zero", "y = step.Accum(fn=sum_s, b=0).apply(E0)\nreturn y", 1, "Accum(fn=sum_s, b=0)", ["1 <= b <= 1", "got 0"]),
    ("accum_rank0", "y = step.Accum(fn=sum_s, b=1).apply(E4)\nreturn y", 1, "Accum(fn=sum_s, b=1)", ["1 <= b <= 0", "got 1"]),
    ("scan_b_high", "y = step.Scan(fn=sum_s, b=3).apply(E5)\nreturn y", 1, "Scan(fn=sum_s, b=3)", ["1 <= b <= 2", "got 3"]),
    ("accum_fn_input", "y = step.Accum(fn=sum_s, b=1).apply(E1)\nreturn y", 1, "Accum(fn=sum_s, b=1)",
     ["takes fp32", "Buffer(fp32, [D])"]),
    ("accum_no_init", "y = step.Accum(fn=f_s, b=1).apply(E0)\nreturn y", 1, "Accum(fn=f_s, b=1)", ["f_s has no init", "cannot be folded"]),
    ("scan_no_init", "y = step.Scan(fn=f_s, b=1).apply(E0)\nreturn y", 1, "Scan(fn=f_s, b=1)", ["f_s has no init"]),
    ("bufferize_tuple", "z = step.Zip().apply((E0, E1))\ny = step.Bufferize(a=1).apply(z)\nreturn y", 2,
     "Bufferize(a=1)", ["cannot buffer a stream of tuples", "[fp32, Buffer(fp32, [D])]"]),
    ("bufferize_range", "y = step.Bufferize(a=2).apply(E0)\nreturn y", 1, "Bufferize(a=2)", ["1 <= a <= 1", "got 2"]),
    ("streamify_scalar", "y = step.Streamify().apply(E0)\nreturn y", 1, "Streamify()",
     ["a stream of Buffers", "elements of type fp32"]),
    ("streamify_multihot", "y = step.Streamify().apply(E3)\nreturn y", 1, "Streamify()", ["Multihot(fp32, E)"]),
    ("promote_range", "y = step.Promote(b=3).apply(E0)\nreturn y", 1, "Promote(b=3)", ["0 <= b <= 2", "got 3"]),
    ("promote_negative", "y = step.Promote(b=-1).apply(E0)\nreturn y", 1, "Promote(b=-1)", ["0 <= b <= 2", "got -1"]),
    ("repeatref_shape", "y = step.RepeatRef().apply((E0, E5))\nreturn y", 1, "RepeatRef()",
     ["data is [K, M]", "ref is [K, N, M]"]),
    ("repeatref_rank", "y = step.RepeatRef().apply((E0, E2))\nreturn y", 1, "RepeatRef()", ["data is [K, M]", "ref is [N, M]"]),
    ("repeatref_not_pair", "y = step.RepeatRef().apply(E0)\nreturn y", 1, "RepeatRef()", ["a pair (data, ref)", "a stream fp32 [K, M]"]),
    ("flatten_gap", "y = step.Flatten(L=[1, 3]).apply(E5)\nreturn y", 1, "Flatten(L=[1, 3])",
     ["consecutive levels within 1..2", "got [1, 3]"]),
    ("flatten_zero", "y = step.Flatten(L=[0]).apply(E5)\nreturn y", 1, "Flatten(L=[0])", ["within 1..2", "got [0]"]),
    ("flatten_high", "y = step.Flatten(L=[2]).apply(E0)\nreturn y", 1, "Flatten(L=[2])", ["within 1..1", "got [2]"]),
    ("flatten_not_ints", "y = step.Flatten(L=[K]).apply(E0)\nreturn y", 1, "Flatten(L=[K])", ["L must be a list of integers", "got [K]"]),
    ("reshape_index", "y = step.Reshape(L=[2], S=2).apply(E0)\nreturn y", 1, "Reshape(L=[2], S=2)",
     ["distinct dims within 0..1", "got [2]"]),
    ("reshape_repeat", "y = step.Reshape(L=[0, 0], S=2).apply(E0)\nreturn y", 1, "Reshape(L=[0, 0], S=2)", ["distinct", "[0, 0]"]),
    ("reshape_size", "y = step.Reshape(L=[0], S=Q).apply(E0)\nreturn y", 1, "Reshape(L=[0], S=Q)", ["S must be a size", "got Q"]),
    ("partition_idx_type", "p = step.Partition(N=E).apply((E0, E4))\nreturn E0", 1, "Partition(N=E)",
     ["idx must be a stream of Multihot", "elements of type fp32"]),
    ("partition_shape", "p = step.Partition(N=E).apply((E0, E7))\nreturn E0", 1, "Partition(N=E)",
     ["outer dims of data", "data is [K, M]", "idx is [K]"]),
    ("partition_idx_deeper", "p = step.Partition(N=E).apply((E4, E6))\nreturn E4", 1, "Partition(N=E)",
     ["data is [M]", "idx is [K, M]"]),
    ("partition_width", "p = step.Partition(N=3).apply((E4, E3))\nreturn E4", 1, "Partition(N=3)",
     ["N must equal the Multihot width E", "got 3"]),
    ("partition_not_pair", "p = step.Partition(N=E).apply(E4)\nreturn E4", 1, "Partition(N=E)", ["a pair (data, idx)"]),
    ("merge_routes", "parts = step.Partition(N=2).apply((E4, E8))\ny = step.Merge(fn=sum_s).apply((parts, E3))\nreturn y", 2,
     "Merge(fn=sum_s)", ["idx has 3 routes", "the list has 2 streams"]),
    ("merge_mismatched", PARTS + "outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, [f_s, to_b, f_s])]\n"
     "y = step.Merge(fn=sum_s).apply((outs, E6))\nreturn y", 3, "Merge(fn=sum_s)",
     ["share element type", "stream 0 is fp32", "stream 1 is Buffer(fp32, [D])"]),
    ("merge_not_list", "y = step.Merge(fn=sum_s).apply((E4, E3))\nreturn y", 1, "Merge(fn=sum_s)",
     ["first input must be a list of streams", "a stream fp32 [M]"]),
    ("merge_idx_type", PARTS + "y = step.Merge(fn=sum_s).apply((parts, E2))\nreturn y", 2, "Merge(fn=sum_s)",
     ["idx must be a stream of Multihot", "fp32"]),
    ("merge_no_init", PARTS + "y = step.Merge(fn=f_s).apply((parts, E6))\nreturn y", 2, "Merge(fn=f_s)", ["f_s has no init"]),
    ("merge_fn_input", PARTS + "y = step.Merge(fn=sum_b).apply((parts, E6))\nreturn y", 2, "Merge(fn=sum_b)",
     ["takes Buffer(fp32, [D])", "the list streams has elements of type fp32"]),
    ("unknown_fn", "y = step.Map(fn=nope).apply(E0)\nreturn y", 1, "Map(fn=nope)",
     ["fn=nope is not a fn of this task", "f_b, f_s, pair, sum_b, sum_s, to_b"]),
    ("unknown_fn_in_list", "fs = [f_s, nope]\nreturn E0", 1, "", ["nope is not a fn of this task"]),
    ("unknown_fn_inline_list", PARTS + "outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, [f_s, nope, f_s])]\nreturn E0",
     2, "Map(fn=f)", ["nope is not a fn of this task"]),
    ("unknown_name", "y = step.Map(fn=f_s).apply(X9)\nreturn y", 1, "Map(fn=f_s)",
     ["X9 is not defined", "streams defined so far: E0, E1"]),
    ("unknown_name_in_tuple", "y = step.Zip().apply((E0, X9))\nreturn y", 1, "Zip()", ["X9 is not defined"]),
    ("unknown_name_return", "y = step.Map(fn=f_s).apply(E0)\nreturn z", 2, "return", ["z is not defined"]),
    ("unknown_list", "outs = [step.Map(fn=f_s).apply(p) for p in nolist]\nreturn E0", 1, "Map(fn=f_s)", ["nolist is not defined"]),
    ("wrong_kwarg", "y = step.Map(fn=f_s, b=1).apply(E0)\nreturn y", 1, "Map(fn=f_s, b=1)", ["unknown argument b", "Map takes fn"]),
    ("wrong_kwarg_none", "y = step.Zip(n=1).apply((E0, E0))\nreturn y", 1, "Zip(n=1)", ["unknown argument n", "Zip takes no arguments"]),
    ("missing_kwarg", "y = step.Accum(fn=sum_s).apply(E0)\nreturn y", 1, "Accum(fn=sum_s)", ["missing argument b (int)"]),
    ("missing_fn", "y = step.Map().apply(E0)\nreturn y", 1, "Map()", ["missing argument fn (fn)"]),
    ("int_kind", "y = step.Accum(fn=sum_s, b=K).apply(E0)\nreturn y", 1, "Accum(fn=sum_s, b=K)", ["b must be an integer", "got K"]),
    ("size_kind", "y = step.Repeat(n=f_s).apply(E0)\nreturn y", 1, "Repeat(n=f_s)", ["n must be a size", "got f_s"]),
    ("size_positive", "y = step.Repeat(n=0).apply(E0)\nreturn y", 1, "Repeat(n=0)", ["n must be positive", "got 0"]),
    ("fn_kind", "y = step.Map(fn=3).apply(E0)\nreturn y", 1, "Map(fn=3)", ["fn=3 is not a fn of this task"]),
    ("copy_not_unpacked", "y = step.Copy().apply(E0)\nreturn y", 1, "Copy", ["Copy produces two streams", "unpack them"]),
    ("unpack_count", "a, b, c = step.Copy().apply(E0)\nreturn a", 1, "Copy()", ["produces 2 stream(s)", "unpacked into 3 names"]),
    ("unpack_single", "a, b = step.Map(fn=f_s).apply(E0)\nreturn a", 1, "Map(fn=f_s)", ["produces 1 stream(s)", "into 2 names"]),
    ("unpack_partition", "a, b = step.Partition(N=E).apply((E4, E3))\nreturn a", 1, "Partition(N=E)",
     ["produces 3 stream(s)", "into 2 names"]),
    ("return_list", PARTS + "return parts", 2, "return", ["parts is not a stream"]),
    ("return_fn_list", "fs = [f_s]\nreturn fs", 2, "return", ["fs is not a stream"]),
    ("fn_list_as_stream", "fs = [f_s]\ny = step.Map(fn=f_s).apply(fs)\nreturn y", 2, "Map(fn=f_s)", ["fs is a list of fns, not a stream"]),
    ("list_as_stream", PARTS + "y = step.Map(fn=f_s).apply(parts)\nreturn y", 2, "Map(fn=f_s)",
     ["must be one stream", "a list of 3 streams"]),
    ("zip_lengths", PARTS + "outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, [f_s, f_s])]\nreturn E0", 2, "Map(fn=f)",
     ["different lengths [2, 3]"]),
    ("comprehension_over_stream", "outs = [step.Map(fn=f_s).apply(p) for p in E0]\nreturn E0", 1, "Map(fn=f_s)",
     ["E0 is not a list of streams or fns"]),
    ("comprehension_copy", PARTS + "outs = [step.Copy().apply(p) for p in parts]\nreturn E0", 2, "Copy()",
     ["must produce one stream"]),
    ("comprehension_fn_var_as_stream", PARTS + "outs = [step.Map(fn=f_s).apply(f) for p, f in zip(parts, [f_s, f_s, f_s])]\nreturn E0",
     2, "Map(fn=f_s)", ["f is not defined"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_typing_error(case):
    _, text, line, label, fragments = case
    program = parse_program(text)
    with pytest.raises(StepTypeError) as err:
        typecheck(program, input_types(), fns(), B)
    e = err.value
    assert e.line == line
    assert "\n" not in e.message
    assert e.message.startswith(f"line {line}: "), e.message
    assert label in e.message, e.message
    for frag in fragments:
        assert frag in e.message, (frag, e.message)
    assert e.stage == "type"


@pytest.mark.parametrize("engine", ["vectorised", "naive"])
def test_run_program_raises_the_same_type_error_before_running(engine, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an engine ran a program that does not type-check")

    monkeypatch.setattr(VectorisedEngine, "execute", boom)
    monkeypatch.setattr(NaiveEngine, "execute", boom)
    text = "y = step.Map(fn=f_s).apply(E0)\nz = step.Accum(fn=sum_s, b=2).apply(y)\nreturn z"
    inputs = {"E0": stream("fp32", ["K", "M"], torch.zeros(2, 4))}
    with pytest.raises(StepTypeError) as err:
        run_program(parse_program(text), inputs, fns(), B, engine=engine)
    assert err.value.line == 2 and "Accum(fn=sum_s, b=2)" in err.value.message


def test_well_typed_programs_pass():
    # the typing rules accept the forms the cases above break
    ok = [
        ("y = step.Map(fn=pair).apply((E0, E1))\nreturn y", "fp32 [K, M]"),
        ("y = step.Accum(fn=sum_s, b=2).apply(E5)\nreturn y", "fp32 [M]"),
        ("y = step.RepeatRef().apply((E0, E5))\nreturn y", None),
        ("y = step.RepeatRef().apply((E2, E5))\nreturn y", "fp32 [K, N, M]"),
        ("y = step.Flatten(L=[1, 2]).apply(E5)\nreturn y", "fp32 [K*M*N]"),
        ("y = step.Reshape(L=[1], S=M).apply(E0)\nreturn y", "fp32 [K, M, 1]"),
        (PARTS + "y = step.Merge(fn=sum_s).apply((parts, E3))\nreturn y", "fp32 [M]"),
        ("p = step.Partition(N=E).apply((E0, E6))\ny = step.Merge(fn=sum_s).apply((p, E6))\nreturn y", "fp32 [K, M]"),
    ]
    for text, expected in ok:
        try:
            (out,) = typecheck(parse_program(text), input_types(), fns(), B)
        except StepTypeError as exc:
            assert expected is None, (text, exc.message)
            continue
        assert expected is not None and str(out) == expected, (text, str(out))


# ---------------------------------------------------------------------------
# resources


def _no_engine(monkeypatch):
    calls = []

    def spy(self, *a, **k):
        calls.append(type(self).__name__)
        raise AssertionError("an operator ran although the program is over the element budget")

    monkeypatch.setattr(VectorisedEngine, "execute", spy)
    monkeypatch.setattr(NaiveEngine, "execute", spy)
    monkeypatch.setattr(StepFn, "map", spy)
    monkeypatch.setattr(StepFn, "fold", spy)
    return calls


@pytest.mark.parametrize("engine", ["vectorised", "naive"])
def test_huge_repeat_is_rejected_before_allocation(engine, monkeypatch):
    inputs = {"E0": stream("fp32", ["K", "M"], torch.zeros(2, 4))}
    calls = _no_engine(monkeypatch)
    allocations = []
    real_full, real_zeros, real_empty = torch.full, torch.zeros, torch.empty
    monkeypatch.setattr(torch, "full", lambda *a, **k: allocations.append("full") or real_full(*a, **k))
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocations.append("zeros") or real_zeros(*a, **k))
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append("empty") or real_empty(*a, **k))
    text = "y = step.Map(fn=f_s).apply(E0)\nz = step.Repeat(n=1048576*1048576).apply(y)\nw = step.Accum(fn=sum_s, b=1).apply(z)\nreturn w"
    with pytest.raises(ResourceError) as err:
        run_program(parse_program(text), inputs, fns(), B, engine=engine)
    e = err.value
    assert e.line == 2 and e.stage == "resource" and "\n" not in e.message
    assert "Repeat(n=1048576*1048576)" in e.message
    assert f"{2 ** 40 * 8:,} elements" in e.message and f"limit {2 ** 27:,}" in e.message
    assert calls == [] and allocations == []


def test_max_elements_is_the_limit():
    text = "y = step.Repeat(n=K).apply(E0)\nreturn y"
    inputs = {"E0": stream("fp32", ["K", "M"], torch.zeros(2, 4))}
    out = run_program(parse_program(text), inputs, fns(), B, max_elements=32)  # 4 * 4 * 2 = 32
    assert out[0].data.shape == (2, 4, 4)
    with pytest.raises(ResourceError) as err:
        run_program(parse_program(text), inputs, fns(), B, max_elements=31)
    assert "32 elements" in err.value.message and "limit 31" in err.value.message


def test_route_sizes_are_bounded_by_positions(monkeypatch):
    # a route may carry every position: the check uses that bound, before routing anything
    calls = _no_engine(monkeypatch)
    text = "a, b, c = step.Partition(N=E).apply((E0, E1))\nreturn a, b, c"
    inputs = {"E0": stream("Buffer(fp32, [D])", ["K", "M"], torch.zeros(2, 4, 2)),
              "E1": stream("Multihot(fp32, E)", ["M"], torch.zeros(2, 3))}
    with pytest.raises(ResourceError) as err:
        run_program(parse_program(text), inputs, fns(), B, max_elements=15)  # a route of 2 tokens: 2*4*2 = 16
    assert "Partition(N=E)" in err.value.message and "16 elements" in err.value.message
    assert calls == []


def test_resource_error_covers_buffer_and_tuple_fields():
    text = "z = step.Zip().apply((E0, E1))\ny = step.Repeat(n=2).apply(z)\nreturn y"
    inputs = {"E0": stream("fp32", ["K", "M"], torch.zeros(2, 4)),
              "E1": stream("Buffer(fp32, [D])", ["K", "M"], torch.zeros(2, 4, 2))}
    # the Zip holds 8 + 16 = 24 elements, the Repeat 48
    run_program(parse_program(text), inputs, fns(), B, max_elements=48)
    with pytest.raises(ResourceError) as err:
        run_program(parse_program(text), inputs, fns(), B, max_elements=47)
    assert err.value.line == 2 and "48 elements" in err.value.message


def test_a_stream_type_remembers_its_hash_but_does_not_pickle_it(tmp_path):
    """The remembered hash is per process (symbol names are strings, whose hashes are salted per process):
    a type pickled after hashing must hash afresh, and so still find its equal as a dict key, elsewhere."""
    import os
    import pickle
    import subprocess
    import sys

    stype = StreamType(parse_dtype("Buffer(fp32, [N, D])"), parse_dims(["K", "M"]))
    assert hash(stype) == hash(StreamType(parse_dtype("Buffer(fp32, [N, D])"), parse_dims(["K", "M"])))
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(stype))
    script = (
        "import pickle, sys\n"
        "from stepforge.simulator import StreamType, parse_dims, parse_dtype\n"
        "t = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "fresh = StreamType(parse_dtype('Buffer(fp32, [N, D])'), parse_dims(['K', 'M']))\n"
        "print(t == fresh, {fresh: 1}.get(t), hash(t) == hash(fresh))\n"
    )
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.pkl")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert out.split() == ["True", "1", "True"], out


def test_an_input_of_the_wrong_shape_is_refused_after_runs_of_the_right_one():
    """The input check remembers expected shapes per (type, binding); a later wrong tensor is still caught."""
    from stepforge.simulator import StepRuntimeError

    fns = fn_table(B, FNS)
    program = parse_program("y = step.Map(fn=f_s).apply(E0)\nreturn y")
    for _ in range(2):
        (out,) = run_program(program, {"E0": stream("fp32", ["N", "M"], torch.zeros(2, 3))}, fns, B)
        assert torch.equal(out.data, torch.ones(2, 3))
    with pytest.raises(StepRuntimeError, match=r"input E0: tensor shape \[\(3, 2\)\] does not match its type"):
        run_program(program, {"E0": stream("fp32", ["N", "M"], torch.zeros(3, 2))}, fns, B)
    with pytest.raises(StepRuntimeError, match=r"input E0: tensor shape \[\(2, 3\)\] does not match"):
        run_program(program, {"E0": stream("fp32", ["N", "M"], torch.zeros(2, 3))}, fns, {**B, "N": 4})
