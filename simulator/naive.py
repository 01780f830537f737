"""The naive engine: docs/language.md section 4 written element by element.

A stream is a nested Python list, outermost dim first, whose leaves are
elements (a list with one tensor per field). Every fn call sees one element.
This is the oracle of the differential tests and the baseline of
scripts/bench_simulator.py, so it stays as plain as the spec.
"""

from __future__ import annotations

import torch

from stepforge.simulator.errors import StepRuntimeError
from stepforge.simulator.interpreter import Engine, TypedOp
from stepforge.simulator.shapes import shape_values
from stepforge.simulator.values import Stream, StreamType


def to_nested(fields: list[torch.Tensor], depth: int):
    if depth == 0:
        return list(fields)
    return [to_nested([f[i] for f in fields], depth - 1) for i in range(fields[0].shape[0])]


def from_nested(node, depth: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Stack a nested stream back into one tensor per field of the given shapes."""
    if depth == 0:
        return [t.reshape(s) for t, s in zip(node, shapes)]
    if len(node) == 0:
        return [torch.zeros(s, dtype=torch.float32) for s in shapes]
    children = [from_nested(c, depth - 1, [s[1:] for s in shapes]) for c in node]
    return [torch.stack([c[i] for c in children]) for i in range(len(shapes))]


def at_depth(node, depth: int, f):
    """Apply `f` to every node `depth` levels down."""
    if depth == 0:
        return f(node)
    return [at_depth(c, depth - 1, f) for c in node]


def nodes_below(node, depth: int):
    """The nodes `depth` levels down, in stream order (innermost fastest)."""
    if depth == 0:
        yield node
        return
    for c in node:
        yield from nodes_below(c, depth - 1)


class NaiveEngine(Engine):
    def load(self, stream: Stream, binding):
        return to_nested(stream.field_tensors(), len(stream.type.shape))

    def unload(self, value, stype: StreamType, binding) -> Stream:
        return Stream.from_fields(stype, from_nested(value, len(stype.shape), stype.tensor_shapes(binding)))

    def execute(self, op: TypedOp, arg, binding: dict):
        return getattr(self, "_" + op.call.op.lower())(op, arg, binding)

    def _map(self, op, arg, binding):
        fn = op.params["fn"]
        if isinstance(arg, tuple):
            arg = self._zip(op, arg, binding)
            depth = len(op.arg_type[0].shape)
        else:
            depth = len(op.arg_type.shape)
        return at_depth(arg, depth, lambda element: fn.call(element, None, binding))

    def _zip(self, op, arg, binding):
        depth = len(op.arg_type[0].shape)

        def pair(nodes, d):
            if d == 0:
                return [f for n in nodes for f in n]
            return [pair([n[i] for n in nodes], d - 1) for i in range(len(nodes[0]))]

        return pair(list(arg), depth)

    def _accum(self, op, arg, binding):
        fn, k = op.params["fn"], op.params["b"]

        def fold(node):
            state = fn.init_state(binding)
            for element in nodes_below(node, k):
                state = fn.call(element, state, binding)
            return state

        return at_depth(arg, len(op.arg_type.shape) - k, fold)

    def _scan(self, op, arg, binding):
        fn, k = op.params["fn"], op.params["b"]

        def scan(node):
            state = fn.init_state(binding)

            def walk(n, d):
                nonlocal state
                if d == 0:
                    state = fn.call(n, state, binding)
                    return state
                return [walk(c, d - 1) for c in n]

            return walk(node, k)

        return at_depth(arg, len(op.arg_type.shape) - k, scan)

    def _copy(self, op, arg, binding):
        return [arg, arg]

    def _bufferize(self, op, arg, binding):
        k = op.params["a"]
        shapes = [shape_values(f.elem_dims(), binding) for f in op.out_type.fields()]
        return at_depth(arg, len(op.arg_type.shape) - k, lambda node: from_nested(node, k, shapes))

    def _streamify(self, op, arg, binding):
        levels = len(op.arg_type.elem.dims)
        return at_depth(arg, len(op.arg_type.shape), lambda element: to_nested(element, levels))

    def _promote(self, op, arg, binding):
        return at_depth(arg, op.arg_type.rank + 1 - op.params["b"], lambda node: [node])

    def _repeat(self, op, arg, binding):
        times = op.params["n"].evaluate(binding)
        return at_depth(arg, len(op.arg_type.shape), lambda element: [element] * times)

    def _repeatref(self, op, arg, binding):
        data, ref = arg

        def walk(d, r, depth):
            if depth == 0:
                return [d] * len(r)
            return [walk(dc, rc, depth - 1) for dc, rc in zip(d, r)]

        return walk(data, ref, len(op.arg_type[0].shape))

    def _flatten(self, op, arg, binding):
        i, j = op.params["L"][0], op.params["L"][-1]
        r = op.arg_type.rank
        return at_depth(arg, r - j, lambda node: list(nodes_below(node, j - i + 2)))

    def _reshape(self, op, arg, binding):
        size = op.params["S"].evaluate(binding)
        r = op.arg_type.rank
        for i in sorted(set(op.params["L"]), reverse=True):
            def split(node, i=i):
                if len(node) % size:
                    raise StepRuntimeError(f"dim {i} has size {len(node)}, which S={size} does not divide")
                return [node[c * size:(c + 1) * size] for c in range(len(node) // size)]

            arg = at_depth(arg, r - i, split)
            r += 1
        return arg

    def _partition(self, op, arg, binding):
        data, idx = arg
        depth = len(op.arg_type[1].shape)
        outs = [[] for _ in op.out_type]
        for sub, element in zip(nodes_below(data, depth), nodes_below(idx, depth)):
            bits = element[0]
            for route in range(len(outs)):
                if bits[route] != 0:
                    outs[route].append(sub)
        for out, out_type in zip(outs, op.out_type):
            binding[out_type.shape[-1].symbols[0]] = len(out)
        return outs

    def _merge(self, op, arg, binding):
        streams, idx = arg
        fn = op.params["fn"]
        inner_depth = len(op.arg_type[0].items[0].shape) - 1
        inner_sizes = shape_values(op.out_type.shape[:inner_depth], binding)[::-1]
        out_shapes = [shape_values(f.elem_dims(), binding) for f in op.out_type.fields()]
        read = [0] * len(streams)

        def filled(sizes, make):
            return make() if not sizes else [filled(sizes[1:], make) for _ in range(sizes[0])]

        def fold(state, x, d):
            if d == 0:
                return fn.call(x, state, binding)
            return [fold(s, xc, d - 1) for s, xc in zip(state, x)]

        def merge_at(element):
            bits = element[0]
            state = None
            for route, stream in enumerate(streams):
                if bits[route] == 0:
                    continue
                if read[route] >= len(stream):
                    raise StepRuntimeError(f"route {route} carries {len(stream)} elements but idx selects it more often")
                if state is None:
                    state = filled(list(inner_sizes), lambda: fn.init_state(binding))
                state = fold(state, stream[read[route]], inner_depth)
                read[route] += 1
            if state is None:
                state = filled(list(inner_sizes), lambda: [torch.zeros(s) for s in out_shapes])
            return state

        out = at_depth(idx, len(op.arg_type[1].shape), merge_at)
        for route, stream in enumerate(streams):
            if read[route] != len(stream):
                raise StepRuntimeError(f"route {route} carries {len(stream)} elements but idx selects it {read[route]} times")
        return out
