"""Helpers for the simulator tests, and a generator of random well-typed STeP programs.

The generator builds programs type-correct by construction (and the tests
still run the simulator's own `typecheck` on every one). It draws its choices
through a `Chooser`, so the same code runs under hypothesis (shrinkable
examples) and under a seeded `random.Random` (the coverage check).

A generated program chains 1..6 operator steps; `focus` forces one operator
to appear, so a run stratified by operator covers all 14. Partner streams an
operator needs (Zip's second stream, RepeatRef's ref, Partition's multihot
idx) come from a live stream of the right shape, from a Copy, or from a new
program input. Every stream is consumed at most once; the program returns
every stream it made that nothing consumed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import torch

from stepforge.simulator import (
    BufferType,
    MultihotType,
    ScalarType,
    Stream,
    StreamType,
    TupleType,
    make_fn,
    parse_dims,
    parse_dtype,
    parse_program,
    run_program,
)
from stepforge.simulator.fns import build_namespace
from stepforge.simulator.shapes import Dim, as_dim, product
from stepforge.simulator.types import make_buffer, make_tuple

OPS = (
    "Map", "Zip", "Accum", "Scan", "Copy", "Bufferize", "Streamify", "Promote",
    "Repeat", "RepeatRef", "Flatten", "Reshape", "Partition", "Merge",
)
STANDARD = ("M", "N", "K", "D", "E")
FP32 = ScalarType("fp32")


# ---------------------------------------------------------------------------
# small helpers shared by the simulator test modules


def fn_table(binding: dict, specs: list, global_code: str | None = None) -> dict:
    """StepFns from `(func_name, input_dtype, output_dtype, apply[, init])` tuples."""
    ns = build_namespace(binding, global_code=global_code)
    out = {}
    for spec in specs:
        name, ind, outd, body = spec[:4]
        init = spec[4] if len(spec) > 4 else None
        out[name] = make_fn(name, name, ind, outd, body, init, namespace=ns)
    return out


def stream(dtype, dims, data) -> Stream:
    """A Stream from a dtype text (or list), a dims list and its tensor(s)."""
    return Stream(StreamType(parse_dtype(dtype), parse_dims(dims)), data)


def run(text: str, inputs: dict, fns: dict, binding: dict, engine: str, **kw) -> list:
    return run_program(parse_program(text), inputs, fns, binding, engine=engine, **kw)


# Where run_both runs the engines: $STEPFORGE_TEST_DEVICE (e.g. cuda), default cpu.
# Inputs are still generated on the CPU, so every device sees the same programs and data.
TEST_DEVICE = os.environ.get("STEPFORGE_TEST_DEVICE", "cpu")


def run_both(text: str, inputs: dict, fns: dict, binding: dict) -> tuple[list, list]:
    """Run on both engines (each on its own copy of the inputs), on TEST_DEVICE."""
    with torch.device(TEST_DEVICE):
        vec = run(text, _clone_inputs(inputs), fns, dict(binding), "vectorised")
        nai = run(text, _clone_inputs(inputs), fns, dict(binding), "naive")
    return vec, nai


def _clone_inputs(inputs: dict) -> dict:
    move = lambda t: t.to(TEST_DEVICE, copy=True)  # noqa: E731
    return {n: Stream(s.type, [move(t) for t in s.data] if isinstance(s.data, list) else move(s.data))
            for n, s in inputs.items()}


def fields(s: Stream) -> list:
    return s.field_tensors()


def assert_same_streams(a: list, b: list, rtol: float = 1e-5, atol: float = 1e-5, where: str = "") -> None:
    """Equal stream types, equal tensor shapes, values close (inf == inf, nan == nan)."""
    assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} outputs"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.type == y.type, f"{where}: output {i}: type {x.type} vs {y.type}"
        fx, fy = fields(x), fields(y)
        assert len(fx) == len(fy) == len(x.type.fields()), f"{where}: output {i}: field counts"
        for j, (tx, ty) in enumerate(zip(fx, fy)):
            assert tx.dtype == ty.dtype == torch.float32, f"{where}: output {i} field {j}: dtype"
            assert tx.shape == ty.shape, f"{where}: output {i} field {j}: shape {tuple(tx.shape)} vs {tuple(ty.shape)}"
            if not torch.allclose(tx, ty, rtol=rtol, atol=atol, equal_nan=True):
                diff = (tx - ty).abs().nan_to_num(0.0).max().item()
                raise AssertionError(f"{where}: output {i} field {j}: values differ (max abs diff {diff})")


# ---------------------------------------------------------------------------
# choosers


class Chooser:
    def integer(self, lo: int, hi: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def choice(self, seq):
        seq = list(seq)
        return seq[self.integer(0, len(seq) - 1)]

    def coin(self, p_num: int = 1, p_den: int = 2) -> bool:
        return self.integer(0, p_den - 1) < p_num


class RandomChooser(Chooser):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)


class DataChooser(Chooser):
    """Draws through hypothesis' `st.data()` object, so examples shrink."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def integer(self, lo, hi):
        return self.data.draw(self.st.integers(lo, hi))


# ---------------------------------------------------------------------------
# type and dim text (what a task file would write)


def dim_text(d: Dim) -> str:
    """A dim as dtype text: powers written as repeated products (K*K), fractions as /X."""
    num = [n for n, p in d.powers if p > 0 for _ in range(p)]
    den = [n for n, p in d.powers if p < 0 for _ in range(-p)]
    c = Fraction(d.coeff)
    head = num[:]
    if c.numerator != 1 or not head:
        head = [str(c.numerator)] + head
    den = den + ([str(c.denominator)] if c.denominator != 1 else [])
    return "*".join(head) + "".join("/" + t for t in den)


def type_text(t) -> Any:
    if isinstance(t, TupleType):
        return [type_text(f) for f in t.items]
    if isinstance(t, ScalarType):
        return t.dtype
    if isinstance(t, MultihotType):
        return f"Multihot({t.dtype}, {dim_text(t.width)})"
    if isinstance(t, BufferType):
        return f"Buffer({type_text(t.inner)}, [{', '.join(dim_text(d) for d in t.dims)}])"
    raise TypeError(t)


def _standard_only(d: Dim) -> bool:
    return all(s in STANDARD for s in d.symbols)


def fn_ok(st) -> bool:
    """A fn can be written for the stream's elements: their dims use no route size (those have no name)."""
    return all(_standard_only(d) for f in st.fields() for d in f.elem_dims())


def shape_ok(st) -> bool:
    """The shape can be declared for a program input: no route sizes."""
    return all(_standard_only(d) for d in st.shape)


# ---------------------------------------------------------------------------
# fn pools. Each entry: (output type, body, init or None, tags)


def map_pool(t) -> list:
    fs = t.fields()
    pool = []
    if len(fs) == 1:
        f = fs[0]
        if isinstance(f, ScalarType):
            pool += [
                (FP32, "[input[0] * 2.0 + 1.0]", None, ()),
                (FP32, "[torch.tanh(input[0]) - 0.25]", None, ()),
                (FP32, "if input[0] > 0:\n    return [input[0] * 3.0]\nreturn [input[0] - 1.0]", None, ("branch",)),
                (BufferType(FP32, (Dim.sym("D"),)), "[input[0] * torch.arange(D_value, dtype=torch.float32)]", None, ()),
                (MultihotType("fp32", Dim.sym("E")),
                 "[(torch.arange(E_value, dtype=torch.float32) < input[0] * E_value).to(torch.float32)]", None, ()),
            ]
        elif isinstance(f, BufferType):
            pool += [
                (f, "[input[0] * 0.5 - 1.0]", None, ()),
                (f, "[torch.relu(input[0])]", None, ()),
                (f, "if input[0].sum() > 0:\n    return [input[0] * 2.0]\nreturn [-input[0]]", None, ("branch",)),
                (FP32, "[input[0].sum()]", None, ()),
                (FP32, "[(input[0] * input[0]).sum() - 1.0]", None, ()),
            ]
            pool.append((f, "[input[0] - input[0][0]]", None, ("index",)))
            if len(f.dims) >= 2:
                inner = make_buffer(f.inner, f.dims[:-1])  # tensor axis 0 is the outermost buffer dim
                pool.append((inner, "[input[0].sum(0)]", None, ()))
        elif isinstance(f, MultihotType):
            pool += [
                (FP32, "[input[0].sum()]", None, ()),
                (f, "[1.0 - input[0]]", None, ()),
            ]
    else:
        rest = " + ".join(f"input[{i}].sum()" for i in range(1, len(fs)))
        pool += [
            (fs[0], f"[input[0] * 1.0 + {rest}]", None, ()),
            (t, "[" + ", ".join(f"input[{i}] * {i + 2}.0" for i in range(len(fs))) + "]", None, ()),
            (fs[0], f"if input[0].sum() > 0:\n    return [input[0] + {rest}]\nreturn [input[0] - 1.0]", None, ("branch",)),
        ]
        if isinstance(fs[1], BufferType):
            pool.append((fs[0], "[input[0] + input[1][0].sum()]", None, ("index",)))
    return pool


def fold_pool(t) -> list:
    fs = t.fields()
    pool = []
    if len(fs) == 1:
        f = fs[0]
        pool += [
            (f, "[state[0] + input[0]]", 0, ("add",)),
            (f, "[torch.maximum(state[0], input[0])]", "-inf", ("max",)),
            (f, "if input[0].sum() > 0:\n    return [state[0] + input[0]]\nreturn [state[0] * 0.5]", 1, ("branch",)),
            (make_tuple([f, f]),
             "m = torch.maximum(state[0], input[0])\nreturn [m, state[1] * torch.exp(state[0] - m) + torch.exp(input[0] - m)]",
             ["-inf", 0], ("online",)),
        ]
        if not isinstance(f, ScalarType):
            pool.append((FP32, "[state[0] + input[0].sum()]", 0, ("add",)))
        if isinstance(f, BufferType):
            pool.append((FP32, "[state[0] + input[0][0].sum()]", -1, ("index",)))
    else:
        rest = " + ".join(f"input[{i}].sum()" for i in range(1, len(fs)))
        pool += [
            (fs[0], f"[state[0] + input[0] + {rest}]", 0, ("add",)),
            (t, "[" + ", ".join(f"state[{i}] + input[{i}]" for i in range(len(fs))) + "]", [0] * len(fs), ("add",)),
            (fs[0], f"[torch.maximum(state[0], input[0] + {rest})]", "-inf", ("max",)),
            (fs[0], f"if input[0].sum() > 0:\n    return [state[0] + input[0] + {rest}]\nreturn [state[0] - 1.0]", 0, ("branch",)),
        ]
    return pool


# ---------------------------------------------------------------------------
# the generator


@dataclass
class Generated:
    text: str
    input_types: dict
    inputs: dict  # name -> Stream
    fn_specs: list
    binding: dict
    ops: Counter
    features: set

    def fns(self) -> dict:
        return fn_table(self.binding, self.fn_specs)


@dataclass
class _Gen:
    ch: Chooser
    binding: dict
    max_elements: int = 600
    inputs: dict = field(default_factory=dict)
    live: dict = field(default_factory=dict)  # name -> StreamType, in creation order
    lines: list = field(default_factory=list)
    fn_specs: list = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    features: set = field(default_factory=set)
    counter: int = 0
    merges: list = field(default_factory=list)  # (idx input, fold init) of each Merge

    # -- names, sizes -----------------------------------------------------
    def fresh(self, prefix="s") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def value(self, d: Dim) -> int:
        b = dict(self.binding)
        for s in d.symbols:
            b.setdefault(s, 4)  # a route size is at most the positions count; 4 is a fair estimate
        v = Fraction(d.coeff)
        for n, p in d.powers:
            v *= Fraction(b[n]) ** p
        return int(v) if v.denominator == 1 else 4

    def elements(self, st: StreamType) -> int:
        n = 1
        for d in st.shape:
            n *= max(self.value(d), 1)
        for f in st.fields():
            for d in f.elem_dims():
                n *= max(self.value(d), 1)
        return n

    def draw_dim(self) -> Dim:
        return as_dim(self.ch.choice(["M", "N", "K", "D", 1, 2, 3]))

    def draw_shape(self, lo=1, hi=3) -> tuple:
        return tuple(self.draw_dim() for _ in range(self.ch.integer(lo, hi)))

    def draw_leaf(self):
        k = self.ch.integer(0, 5)
        if k <= 2:
            return FP32
        if k <= 4:
            return BufferType(FP32, (self.draw_dim(),))
        return BufferType(FP32, (self.draw_dim(), self.draw_dim()))

    def draw_elem(self, allow_tuple=True):
        if allow_tuple and self.ch.coin(1, 6):
            return make_tuple([self.draw_leaf(), self.draw_leaf()])
        return self.draw_leaf()

    # -- fns ---------------------------------------------------------------
    def add_fn(self, in_type, entry) -> tuple[str, Any]:
        out_type, body, init, tags = entry
        name = self.fresh("fn")
        self.fn_specs.append((name, type_text(in_type), type_text(out_type), body, init))
        self.features.update(tags)
        if isinstance(in_type, TupleType):
            self.features.add("tuple_fn")
        return name, out_type

    def map_fn(self, in_type, out_type=None):
        pool = map_pool(in_type)
        if out_type is not None:
            pool = [e for e in pool if e[0] == out_type]
        return self.add_fn(in_type, self.ch.choice(pool))

    def fold_fn(self, in_type):
        return self.add_fn(in_type, self.ch.choice(fold_pool(in_type)))

    # -- streams -----------------------------------------------------------
    def new_input(self, elem=None, shape=None, multihot_width=None) -> str:
        name = f"E{len(self.inputs)}"
        if multihot_width is not None:
            elem = MultihotType("fp32", multihot_width)
        if elem is None:
            elem = self.draw_elem()
        if shape is None:
            shape = self.draw_shape()
        st = StreamType(elem, tuple(shape))
        self.inputs[name] = st
        self.live[name] = st
        return name

    def consume(self, name: str) -> StreamType:
        return self.live.pop(name)

    def define(self, name: str, st: StreamType) -> None:
        self.live[name] = st

    def pick(self, pred: Callable[[StreamType], bool]) -> str | None:
        names = [n for n, t in self.live.items() if pred(t) and self.elements(t) <= self.max_elements]
        if not names:
            return None
        # prefer recent streams, so operators chain
        return names[-1] if self.ch.coin(2, 3) else self.ch.choice(names)

    def pick_or_new(self, pred, make_elem=None, make_shape=None) -> str:
        name = self.pick(pred)
        if name is not None:
            return name
        for _ in range(20):
            elem = make_elem() if make_elem else self.draw_elem()
            shape = make_shape() if make_shape else self.draw_shape()
            if pred(StreamType(elem, shape)):
                return self.new_input(elem, shape)
        raise AssertionError("no input fits the predicate")

    def emit(self, line: str, op: str) -> None:
        self.lines.append(line)
        self.ops[op] += 1

    def partner(self, x: str) -> str:
        """A stream with x's shape, other than x: live, a new input, or a Copy of x (then maybe a Map)."""
        shape = self.live[x].shape
        names = [n for n, t in self.live.items() if n != x and t.shape == shape]
        if names and self.ch.coin(1, 2):
            return self.ch.choice(names)
        if all(_standard_only(d) for d in shape) and self.ch.coin(1, 2):
            return self.new_input(self.draw_elem(), shape)
        t = self.consume(x)
        b = self.fresh()
        self.emit(f"{x}, {b} = step.Copy().apply({x})", "Copy")  # re-assigning x: a new stream
        self.features.add("reassign")
        self.define(x, t)
        if not fn_ok(t) or self.ch.coin(1, 3):
            self.define(b, t)
            return b
        fn, out = self.map_fn(t.elem)
        c = self.fresh()
        self.emit(f"{c} = step.Map(fn={fn}).apply({b})", "Map")
        self.define(c, StreamType(out, t.shape))
        return c

    # -- operators -----------------------------------------------------------
    def op_map(self):
        x = self.pick(fn_ok) or self.new_input()
        if self.ch.coin(1, 4):
            y = self.partner(x)
            if not fn_ok(self.live[y]):
                y = self.partner(x)
            tx, ty = self.consume(x), self.consume(y)
            fn, out = self.map_fn(make_tuple([tx.elem, ty.elem]))
            z = self.fresh()
            self.emit(f"{z} = step.Map(fn={fn}).apply(({x}, {y}))", "Map")
            self.features.add("map_tuple_arg")
            self.define(z, StreamType(out, tx.shape))
            return
        t = self.consume(x)
        fn, out = self.map_fn(t.elem)
        z = self.fresh()
        self.emit(f"{z} = step.Map(fn={fn}).apply({x})", "Map")
        self.define(z, StreamType(out, t.shape))

    def op_zip(self):
        x = self.pick(lambda t: True) or self.new_input()
        y = self.partner(x)
        tx, ty = self.consume(x), self.consume(y)
        z = self.fresh()
        self.emit(f"{z} = step.Zip().apply(({x}, {y}))", "Zip")
        self.features.add("tuple_stream")
        self.define(z, StreamType(make_tuple([tx.elem, ty.elem]), tx.shape))

    def _fold(self, op):
        x = self.pick_or_new(lambda t: t.rank >= 1 and fn_ok(t), make_shape=lambda: self.draw_shape(2, 3))
        t = self.consume(x)
        k = self.ch.integer(1, t.rank)
        fn, out = self.fold_fn(t.elem)
        z = self.fresh()
        self.emit(f"{z} = step.{op}(fn={fn}, b={k}).apply({x})", op)
        if k >= 2:
            self.features.add(f"{op.lower()}_b2")
        self.define(z, StreamType(out, t.shape if op == "Scan" else t.shape[k:]))

    def op_accum(self):
        self._fold("Accum")

    def op_scan(self):
        self._fold("Scan")

    def op_copy(self):
        x = self.pick(lambda t: True) or self.new_input()
        t = self.consume(x)
        a, b = self.fresh(), self.fresh()
        self.emit(f"{a}, {b} = step.Copy().apply({x})", "Copy")
        self.define(a, t)
        self.define(b, t)

    def op_bufferize(self):
        pred = lambda t: t.rank >= 1 and not isinstance(t.elem, TupleType)
        x = self.pick_or_new(pred, make_elem=lambda: self.draw_elem(False), make_shape=lambda: self.draw_shape(2, 3))
        t = self.consume(x)
        k = self.ch.integer(1, t.rank)
        z = self.fresh()
        self.emit(f"{z} = step.Bufferize(a={k}).apply({x})", "Bufferize")
        if isinstance(t.elem, BufferType):
            self.features.add("buffer_of_buffer")
        self.define(z, StreamType(make_buffer(t.elem, t.shape[:k]), t.shape[k:]))

    def op_streamify(self):
        pred = lambda t: isinstance(t.elem, BufferType)
        x = self.pick_or_new(pred, make_elem=lambda: BufferType(FP32, tuple(self.draw_shape(1, 2))))
        t = self.consume(x)
        z = self.fresh()
        self.emit(f"{z} = step.Streamify().apply({x})", "Streamify")
        self.define(z, StreamType(t.elem.inner, t.elem.dims + t.shape))

    def op_promote(self):
        x = self.pick(lambda t: True) or self.new_input()
        t = self.consume(x)
        k = self.ch.integer(0, t.rank + 1)
        z = self.fresh()
        self.emit(f"{z} = step.Promote(b={k}).apply({x})", "Promote")
        self.define(z, StreamType(t.elem, t.shape[:k] + (Dim.const(1),) + t.shape[k:]))

    def _repeat_size(self, t: StreamType) -> tuple[str, Dim]:
        options = [("1", Dim.const(1)), ("2", Dim.const(2)), ("M", Dim.sym("M")), ("K", Dim.sym("K")),
                   ("E_value", Dim.sym("E")), ("N*D", Dim.sym("N") * Dim.sym("D"))]
        room = max(self.max_elements // max(self.elements(t), 1), 1)
        options = [o for o in options if self.value(o[1]) <= room] or options[:1]
        return self.ch.choice(options)

    def op_repeat(self):
        x = self.pick(lambda t: True) or self.new_input()
        t = self.consume(x)
        text, n = self._repeat_size(t)
        z = self.fresh()
        self.emit(f"{z} = step.Repeat(n={text}).apply({x})", "Repeat")
        self.define(z, StreamType(t.elem, (n,) + t.shape))

    def op_repeatref(self):
        x = self.pick(lambda t: True) or self.new_input()
        t = self.live[x]
        if self.ch.coin(1, 2) and shape_ok(t):
            text, n = self._repeat_size(t)
            ref = self.new_input(self.draw_elem(), (n,) + t.shape)
        else:
            # ref = Repeat(Map(copy of x))
            self.consume(x)
            a, b = self.fresh(), self.fresh()
            self.emit(f"{a}, {b} = step.Copy().apply({x})", "Copy")
            self.define(a, t)
            x = a
            text, n = self._repeat_size(t)
            c = self.fresh()
            self.emit(f"{c} = step.Repeat(n={text}).apply({b})", "Repeat")
            ref = c
            if fn_ok(t) and self.ch.coin(1, 2):
                fn, out = self.map_fn(t.elem)
                ref = self.fresh()
                self.emit(f"{ref} = step.Map(fn={fn}).apply({c})", "Map")
                self.define(ref, StreamType(out, (n,) + t.shape))
            else:
                self.define(ref, StreamType(t.elem, (n,) + t.shape))
        td, tr = self.consume(x), self.consume(ref)
        z = self.fresh()
        self.emit(f"{z} = step.RepeatRef().apply(({x}, {ref}))", "RepeatRef")
        self.define(z, StreamType(td.elem, tr.shape))

    def op_flatten(self):
        x = self.pick_or_new(lambda t: t.rank >= 1, make_shape=lambda: self.draw_shape(2, 3))
        t = self.consume(x)
        i = self.ch.integer(1, t.rank)
        j = self.ch.integer(i, t.rank)
        z = self.fresh()
        self.emit(f"{z} = step.Flatten(L=[{', '.join(str(v) for v in range(i, j + 1))}]).apply({x})", "Flatten")
        merged = product(t.shape[i - 1: j + 1])
        self.define(z, StreamType(t.elem, t.shape[: i - 1] + (merged,) + t.shape[j + 1:]))

    def op_reshape(self):
        x = self.pick(lambda t: True) or self.new_input()
        t = self.consume(x)
        dims = list(range(t.rank + 1))
        levels = sorted({self.ch.choice(dims) for _ in range(self.ch.integer(1, 2))})
        # S must divide every chosen dim symbolically: 1, a shared size symbol, or a shared constant factor
        shared = set(STANDARD)
        for i in levels:
            shared &= {n for n, p in t.shape[i].powers if p > 0}
        options = [("1", Dim.const(1))] + [(n, Dim.sym(n)) for n in sorted(shared)]
        coeffs = [t.shape[i].coeff for i in levels]
        for c in (2, 3):
            if all(q.denominator == 1 and q.numerator % c == 0 for q in coeffs):
                options.append((str(c), Dim.const(c)))
        text, size = self.ch.choice(options)
        shape = list(t.shape)
        for i in sorted(levels, reverse=True):
            shape[i: i + 1] = [size, shape[i] / size]
        z = self.fresh()
        self.emit(f"{z} = step.Reshape(L=[{', '.join(map(str, levels))}], S={text}).apply({x})", "Reshape")
        self.define(z, StreamType(t.elem, tuple(shape)))

    def _route_width(self) -> tuple[str, Dim]:
        if self.ch.coin(3, 4):
            return self.ch.choice(["E", "E_value"]), Dim.sym("E")
        w = self.ch.integer(1, 3)
        return str(w), Dim.const(w)

    def op_partition(self):
        self._routing(merge=self.ch.coin(1, 2))

    def op_merge(self):
        self._routing(merge=True)

    def _routing(self, merge: bool):
        # the idx is a multihot program input of the data's outer shape, or (always for data
        # whose shape has route sizes, e.g. a route of an earlier Partition) computed from
        # the data itself by a Map: x, c = Copy(x); idx = Map(route_fn).apply(c)
        ok = lambda t: fn_ok(t) and (shape_ok(t) or self.ch.coin(1, 2)) if merge else (shape_ok(t) or fn_ok(t))
        x = self.pick(ok) or self.new_input(self.draw_elem(), self.draw_shape())
        t = self.live[x]
        if fn_ok(t) and (not shape_ok(t) or self.ch.coin(1, 4)):
            c = self.fresh()
            self.emit(f"{x}, {c} = step.Copy().apply({x})", "Copy")  # x: re-assigned, still live
            route_fn, _ = self.add_fn(t.elem, (MultihotType("fp32", Dim.sym("E")),
                                               "s = input[0].sum()\n"
                                               "return [(torch.arange(E_value, dtype=torch.float32) < s * E_value).float()]",
                                               None, ("derived_route",)))
            idx = self.fresh("route")
            self.emit(f"{idx} = step.Map(fn={route_fn}).apply({c})", "Map")
            if not shape_ok(t):
                self.features.add("nested_partition")
            q, n_text, width = 0, self.ch.choice(["E", "E_value"]), Dim.sym("E")
        else:
            q = self.ch.integer(0, t.rank)
            n_text, width = self._route_width()
            idx = self.new_input(shape=t.shape[q:], multihot_width=width)
            self.consume(idx)
        self.consume(x)
        n_routes = self.value(width)
        parts = self.fresh("parts")
        route_types = [StreamType(t.elem, t.shape[:q] + (Dim.sym(f"route{r}_{parts}"),)) for r in range(n_routes)]
        if not merge:
            names = [self.fresh("p") for _ in range(n_routes)]
            target = ", ".join(names) + ("," if len(names) == 1 else "")
            self.emit(f"{target} = step.Partition(N={n_text}).apply(({x}, {idx}))", "Partition")
            for name, rt in zip(names, route_types):
                self.define(name, rt)
            return
        i1, i2 = self.fresh("idx"), self.fresh("idx")
        self.emit(f"{i1}, {i2} = step.Copy().apply({idx})", "Copy")
        self.emit(f"{parts} = step.Partition(N={n_text}).apply(({x}, {i1}))", "Partition")
        style = self.ch.integer(0, 3)
        elem = t.elem
        if style == 0:  # Merge straight from the partition
            outs = parts
        else:
            entry = self.ch.choice(map_pool(t.elem))
            out_type = entry[0]
            fn0, _ = self.add_fn(t.elem, entry)
            fns = [fn0] + [self.map_fn(t.elem, out_type)[0] for _ in range(n_routes - 1)]
            outs = self.fresh("outs")
            if style == 1:
                fl = self.fresh("fl")
                self.lines.append(f"{fl} = [{', '.join(fns)}]")
                self.emit(f"{outs} = [step.Map(fn=f).apply(p) for p, f in zip({parts}, {fl})]", "Map")
            elif style == 2:
                self.emit(f"{outs} = [step.Map(fn=f).apply(p) for p, f in zip({parts}, [{', '.join(fns)}])]", "Map")
            else:
                self.emit(f"{outs} = [step.Map(fn={fn0}).apply(p) for p in {parts}]", "Map")
            self.features.add("comprehension")
            elem = out_type
        entry = self.ch.choice(fold_pool(elem))
        fn, out = self.add_fn(elem, entry)
        self.merges.append((idx, entry[2]))
        z = self.fresh()
        self.emit(f"{z} = step.Merge(fn={fn}).apply(({outs}, {i2}))", "Merge")
        self.define(z, StreamType(out, t.shape))


def generate(ch: Chooser, focus: str | None = None, max_elements: int = 600) -> Generated:
    """A random well-typed, affine program with random inputs; `focus` is sure to appear."""
    binding = {s: ch.integer(1, 4) for s in STANDARD}
    g = _Gen(ch, binding, max_elements)
    for _ in range(ch.integer(1, 2)):
        g.new_input()
    n_steps = ch.integer(1, 6)
    at = ch.integer(0, n_steps - 1)
    for step in range(n_steps):
        op = focus if (focus and step == at) else ch.choice(OPS)
        getattr(g, "op_" + op.lower())()
    outputs = [n for n in g.live if n not in g.inputs]
    if not outputs:  # only possible if every step consumed into inputs; keep one Map
        g.op_map()
        outputs = [n for n in g.live if n not in g.inputs]
    g.lines.append(f"return {', '.join(outputs)}")
    seed = ch.integer(0, 2**31 - 1)
    inputs, features = make_inputs(g.inputs, binding, seed)
    g.features |= features
    for idx, init in g.merges:
        if idx not in inputs:  # a route computed by a Map
            continue
        bits = inputs[idx].data.reshape(-1, inputs[idx].data.shape[-1])
        inits = init if isinstance(init, list) else [init]
        if bits.numel() and bool((bits.sum(1) == 0).any()):
            g.features.add("merge_no_bit" + ("_-inf" if "-inf" in inits else ""))
        if bits.numel() and bool((bits.sum(0) == 0).any()):
            g.features.add("merge_empty_route")
    return Generated("\n".join(g.lines), dict(g.inputs), inputs, g.fn_specs, binding, g.ops, g.features)


def make_inputs(types: dict, binding: dict, seed: int) -> tuple[dict, set]:
    """Random data: randn for values; multihots with 0/1 bits, some routes empty, some positions without bits."""
    gen = torch.Generator().manual_seed(seed)
    out, features = {}, set()
    for name, st in types.items():
        tensors = []
        for f, shape in zip(st.fields(), st.tensor_shapes(binding)):
            if isinstance(f, MultihotType):
                bits = (torch.rand(shape, generator=gen) < 0.5).float()
                width = shape[-1]
                if torch.rand((), generator=gen) < 0.5 and width > 1:
                    bits[..., int(torch.randint(width, (), generator=gen))] = 0  # an empty route
                if torch.rand((), generator=gen) < 0.5 and bits.numel():
                    flat = bits.reshape(-1, width)
                    flat[int(torch.randint(flat.shape[0], (), generator=gen))] = 0  # a position with no bit
                flat = bits.reshape(-1, width)
                if flat.numel() and bool((flat.sum(0) == 0).any()):
                    features.add("empty_route")
                if flat.numel() and bool((flat.sum(1) == 0).any()):
                    features.add("no_bit_position")
                tensors.append(bits)
            else:
                tensors.append(torch.randn(shape, generator=gen))
        out[name] = Stream(st, tensors[0] if len(tensors) == 1 else tensors)
    return out, features
