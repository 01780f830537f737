"""Typing rules of the STeP operators (docs/language.md section 4).

`infer(call, arg, ctx)` checks an operator application and returns its output
type(s) together with its resolved parameters. Both interpreters and the
search proposer use these rules; nothing else re-implements them. Errors name
the line, the operator, the argument, what was expected and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from stepforge.simulator.errors import StepTypeError
from stepforge.simulator.fns import StepFn
from stepforge.simulator.program import NameRef, OpCall, SizeExpr, format_kw_value
from stepforge.simulator.shapes import Dim, format_shape, product
from stepforge.simulator.types import BufferType, MultihotType, TupleType, make_buffer, make_tuple
from stepforge.simulator.values import StreamType

# Parameter kinds per operator: fn, int (a non-negative integer), size (a Dim), ints (list of integers).
SIGNATURES: dict[str, dict[str, str]] = {
    "Map": {"fn": "fn"},
    "Zip": {},
    "Accum": {"fn": "fn", "b": "int"},
    "Scan": {"fn": "fn", "b": "int"},
    "Copy": {},
    "Bufferize": {"a": "int"},
    "Streamify": {},
    "Promote": {"b": "int"},
    "Repeat": {"n": "size"},
    "RepeatRef": {},
    "Flatten": {"L": "ints"},
    "Reshape": {"L": "ints", "S": "size"},
    "Partition": {"N": "size"},
    "Merge": {"fn": "fn"},
}
STANDARD_SYMBOLS = ("M", "N", "K", "D", "E")


@dataclass(frozen=True)
class StreamList:
    """The type of a list of streams (Partition's result, a comprehension's result)."""

    items: tuple[StreamType, ...]


@dataclass(frozen=True)
class FnListType:
    fns: tuple[str, ...]


ArgType = Union[StreamType, StreamList, FnListType, tuple]


@dataclass
class TypeContext:
    """What typing needs besides the argument types."""

    fns: Mapping[str, StepFn]
    binding: Mapping[str, int] = field(default_factory=dict)
    fn_vars: Mapping[str, str] = field(default_factory=dict)  # comprehension loop variable -> fn name
    dyn_bounds: dict[str, Dim] = field(default_factory=dict)  # dynamic symbol -> upper bound
    _counter: int = 0

    def new_dynamic(self, route: int, bound: Dim) -> Dim:
        self._counter += 1
        name = f"n{route}_{self._counter}"
        self.dyn_bounds[name] = bound
        return Dim.sym(name)

    def known_symbol(self, name: str) -> bool:
        return name in self.binding or name in STANDARD_SYMBOLS


def _err(call: OpCall, what: str) -> StepTypeError:
    return StepTypeError(f"{call.brief()}: {what}", call.line)


def resolve_params(call: OpCall, ctx: TypeContext) -> dict[str, Any]:
    """Check the keyword arguments against the operator's signature and resolve them."""
    signature = SIGNATURES[call.op]
    given = call.kw()
    unknown = [k for k in given if k not in signature]
    if unknown:
        expected = ", ".join(signature) or "no arguments"
        raise _err(call, f"unknown argument {unknown[0]}; {call.op} takes {expected}")
    missing = [k for k in signature if k not in given]
    if missing:
        raise _err(call, f"missing argument {missing[0]} ({signature[missing[0]]})")
    return {k: _resolve(call, k, kind, given[k], ctx) for k, kind in signature.items()}


def _resolve(call: OpCall, key: str, kind: str, value, ctx: TypeContext):
    if kind == "fn":
        name = value.name if isinstance(value, NameRef) else None
        name = ctx.fn_vars.get(name, name)
        if name is None or name not in ctx.fns:
            known = ", ".join(sorted(ctx.fns)) or "none"
            raise _err(call, f"{key}={format_kw_value(value)} is not a fn of this task (its fns: {known})")
        return ctx.fns[name]
    if kind == "int":
        if not isinstance(value, int):
            raise _err(call, f"{key} must be an integer, got {format_kw_value(value)}")
        return value
    if kind == "ints":
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(isinstance(v, int) for v in items):
            raise _err(call, f"{key} must be a list of integers, got {format_kw_value(value)}")
        return tuple(items)
    if kind == "size":
        return _size(call, key, value, ctx)
    raise AssertionError(kind)


def _size(call: OpCall, key: str, value, ctx: TypeContext) -> Dim:
    if isinstance(value, int):
        if value < 1:
            raise _err(call, f"{key} must be positive, got {value}")
        return Dim.const(value)
    if isinstance(value, SizeExpr):
        return product([_size(call, key, f, ctx) for f in value.factors])
    if isinstance(value, NameRef):
        name = value.name
        if name.endswith("_value") and ctx.known_symbol(name[: -len("_value")]):
            return Dim.sym(name[: -len("_value")])
        if ctx.known_symbol(name):
            return Dim.sym(name)
    raise _err(call, f"{key} must be a size (an integer, a size symbol such as D, or E_value), got {format_kw_value(value)}")


def _stream(call: OpCall, arg: ArgType, what: str = "its input") -> StreamType:
    if not isinstance(arg, StreamType):
        raise _err(call, f"{what} must be one stream, got {_describe(arg)}")
    return arg


def _describe(arg: ArgType) -> str:
    if isinstance(arg, StreamType):
        return f"a stream {arg}"
    if isinstance(arg, StreamList):
        return f"a list of {len(arg.items)} streams"
    if isinstance(arg, FnListType):
        return "a list of fns"
    return f"a tuple of {len(arg)}"


def _pair(call: OpCall, arg: ArgType, first: str, second: str) -> tuple[ArgType, ArgType]:
    if not isinstance(arg, tuple) or len(arg) != 2:
        raise _err(call, f"expects a pair ({first}, {second}), got {_describe(arg)}")
    return arg


def _check_fn_input(call: OpCall, fn: StepFn, elem, what: str) -> None:
    if make_tuple([fn.input_type]) != make_tuple([elem]):
        raise _err(call, f"fn {fn.func_name} takes {fn.input_type}, but {what} has elements of type {elem}")


def _check_rank_arg(call: OpCall, key: str, k: int, low: int, high: int, s: StreamType) -> None:
    if not low <= k <= high:
        raise _err(call, f"{key} must satisfy {low} <= {key} <= {high} for a rank-{s.rank} stream "
                         f"{format_shape(s.shape)}, got {k}")


def infer(call: OpCall, arg: ArgType, params: dict[str, Any], ctx: TypeContext) -> Union[StreamType, list[StreamType]]:
    """The output type(s) of `call` applied to an argument of type `arg`."""
    return _RULES[call.op](call, arg, params, ctx)


def _map(call, arg, p, ctx):
    fn: StepFn = p["fn"]
    if isinstance(arg, tuple):
        arg = _zip(call, arg, p, ctx)
    s = _stream(call, arg)
    _check_fn_input(call, fn, s.elem, "the stream")
    return StreamType(fn.output_type, s.shape)


def _zip(call, arg, p, ctx):
    if not isinstance(arg, tuple) or len(arg) < 2:
        raise _err(call, f"expects a tuple of at least two streams, got {_describe(arg)}")
    streams = [_stream(call, a, f"item {i} of the tuple") for i, a in enumerate(arg)]
    for i, s in enumerate(streams[1:], 1):
        if s.shape != streams[0].shape:
            raise _err(call, f"streams must have equal shapes; item 0 is {format_shape(streams[0].shape)}, "
                             f"item {i} is {format_shape(s.shape)}")
    return StreamType(make_tuple([s.elem for s in streams]), streams[0].shape)


def _fold(call, arg, p, ctx, keep_shape: bool):
    fn: StepFn = p["fn"]
    s = _stream(call, arg)
    if not fn.is_fold:
        raise _err(call, f"fn {fn.func_name} has no init, so it cannot be folded")
    _check_rank_arg(call, "b", p["b"], 1, s.rank, s)
    _check_fn_input(call, fn, s.elem, "the stream")
    return StreamType(fn.output_type, s.shape if keep_shape else s.shape[p["b"]:])


def _accum(call, arg, p, ctx):
    return _fold(call, arg, p, ctx, keep_shape=False)


def _scan(call, arg, p, ctx):
    return _fold(call, arg, p, ctx, keep_shape=True)


def _copy(call, arg, p, ctx):
    s = _stream(call, arg)
    return [s, s]


def _bufferize(call, arg, p, ctx):
    s = _stream(call, arg)
    k = p["a"]
    _check_rank_arg(call, "a", k, 1, s.rank, s)
    if isinstance(s.elem, TupleType):
        raise _err(call, f"cannot buffer a stream of tuples ({s.elem})")
    return StreamType(make_buffer(s.elem, s.shape[:k]), s.shape[k:])


def _streamify(call, arg, p, ctx):
    s = _stream(call, arg)
    if not isinstance(s.elem, BufferType):
        raise _err(call, f"its input must be a stream of Buffers, got elements of type {s.elem}")
    return StreamType(s.elem.inner, s.elem.dims + s.shape)


def _promote(call, arg, p, ctx):
    s = _stream(call, arg)
    k = p["b"]
    _check_rank_arg(call, "b", k, 0, s.rank + 1, s)
    return StreamType(s.elem, s.shape[:k] + (Dim.const(1),) + s.shape[k:])


def _repeat(call, arg, p, ctx):
    s = _stream(call, arg)
    return StreamType(s.elem, (p["n"],) + s.shape)


def _repeat_ref(call, arg, p, ctx):
    data, ref = _pair(call, arg, "data", "ref")
    data = _stream(call, data, "data")
    ref = _stream(call, ref, "ref")
    if ref.rank != data.rank + 1 or ref.shape[1:] != data.shape:
        raise _err(call, f"ref's shape without its innermost dim must equal data's shape; data is "
                         f"{format_shape(data.shape)}, ref is {format_shape(ref.shape)}")
    return StreamType(data.elem, ref.shape)


def _flatten(call, arg, p, ctx):
    s = _stream(call, arg)
    levels = p["L"]
    i, j = levels[0], levels[-1]
    if list(levels) != list(range(i, j + 1)) or i < 1 or j > s.rank:
        raise _err(call, f"L must be consecutive levels within 1..{s.rank} for a rank-{s.rank} stream, got {list(levels)}")
    merged = product(s.shape[i - 1: j + 1])
    return StreamType(s.elem, s.shape[: i - 1] + (merged,) + s.shape[j + 1:])


def _reshape(call, arg, p, ctx):
    s = _stream(call, arg)
    size: Dim = p["S"]
    levels = sorted(set(p["L"]), reverse=True)
    if len(levels) != len(p["L"]) or any(not 0 <= i <= s.rank for i in levels):
        raise _err(call, f"L must list distinct dims within 0..{s.rank}, got {list(p['L'])}")
    shape = list(s.shape)
    for i in levels:
        shape[i: i + 1] = [size, shape[i] / size]
    return StreamType(s.elem, tuple(shape))


def _partition(call, arg, p, ctx):
    data, idx = _pair(call, arg, "data", "idx")
    data = _stream(call, data, "data")
    idx = _stream(call, idx, "idx")
    if not isinstance(idx.elem, MultihotType):
        raise _err(call, f"idx must be a stream of Multihot, got elements of type {idx.elem}")
    q = data.rank - idx.rank
    if q < 0 or data.shape[q:] != idx.shape:
        raise _err(call, f"idx's shape must equal the outer dims of data; data is {format_shape(data.shape)}, "
                         f"idx is {format_shape(idx.shape)}")
    routes = p["N"]
    if routes != idx.elem.width:
        raise _err(call, f"N must equal the Multihot width {idx.elem.width}, got {routes}")
    n = _concrete(call, "N", routes, ctx)
    positions = product(idx.shape)
    return [StreamType(data.elem, data.shape[:q] + (ctx.new_dynamic(i, positions),)) for i in range(n)]


def _concrete(call: OpCall, key: str, dim: Dim, ctx: TypeContext) -> int:
    try:
        return dim.evaluate(ctx.binding)
    except ValueError as exc:
        raise _err(call, f"{key} must be a known size here ({exc})") from None


def _merge(call, arg, p, ctx):
    fn: StepFn = p["fn"]
    streams, idx = _pair(call, arg, "list of streams", "idx")
    if not isinstance(streams, StreamList):
        raise _err(call, f"its first input must be a list of streams, got {_describe(streams)}")
    idx = _stream(call, idx, "idx")
    if not isinstance(idx.elem, MultihotType):
        raise _err(call, f"idx must be a stream of Multihot, got elements of type {idx.elem}")
    width = _concrete(call, "the Multihot width", idx.elem.width, ctx)
    if len(streams.items) != width:
        raise _err(call, f"needs one stream per route: idx has {width} routes, the list has {len(streams.items)} streams")
    if not fn.is_fold:
        raise _err(call, f"fn {fn.func_name} has no init, so it cannot merge")
    first = streams.items[0]
    for i, s in enumerate(streams.items):
        if s.elem != first.elem or s.shape[:-1] != first.shape[:-1]:
            raise _err(call, f"list streams must share element type and inner dims; stream 0 is {first}, stream {i} is {s}")
    _check_fn_input(call, fn, first.elem, "the list streams")
    return StreamType(fn.output_type, first.shape[:-1] + idx.shape)


_RULES = {
    "Map": _map, "Zip": _zip, "Accum": _accum, "Scan": _scan, "Copy": _copy,
    "Bufferize": _bufferize, "Streamify": _streamify, "Promote": _promote, "Repeat": _repeat,
    "RepeatRef": _repeat_ref, "Flatten": _flatten, "Reshape": _reshape, "Partition": _partition,
    "Merge": _merge,
}
assert set(_RULES) == set(SIGNATURES)
