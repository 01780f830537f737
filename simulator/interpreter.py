"""Type-check and run a parsed STeP program on an engine (vectorised or naive).

`typecheck` walks the program once with the typing rules of `ops`, without
tensors. `run_program` then checks every tensor's size against the element
budget before anything is allocated and runs each operator on the chosen
engine. Both engines share this walk, so they can only differ in how an
operator computes, which is what the differential tests compare.

Running one program many times: `run_program` remembers the type check (and
the resource check it passed) per (program, input types, fns, binding), and
`prepare_run` + `run_typed` split the checks from the run for a caller that
keeps the checked program itself (the verifier, once per size binding).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

from stepforge.registry import Registry
from stepforge.simulator.errors import ResourceError, StepRuntimeError, StepTypeError, format_int
from stepforge.simulator.fns import StepFn
from stepforge.simulator.ops import FnListType, StreamList, TypeContext, infer, resolve_params
from stepforge.simulator.program import Apply, Comprehension, FnList, OpCall, Program, Return, arg_names
from stepforge.simulator.shapes import format_shape
from stepforge.simulator.values import Stream, StreamType

DEFAULT_MAX_ELEMENTS = 2**27
LIVE_FACTOR = 2  # the streams alive at once may hold this many times the per-stream limit


@dataclass
class TypedOp:
    """One operator application with resolved params and its input/output types."""

    call: OpCall
    params: dict[str, Any]
    arg_type: Any
    out_type: Union[StreamType, list[StreamType]]


@dataclass
class TypedStatement:
    stmt: Any
    ops: list[TypedOp] = field(default_factory=list)  # one, or one per comprehension item


@dataclass
class TypedProgram:
    program: Program
    statements: list[TypedStatement]
    outputs: list[StreamType]
    dyn_bounds: dict
    _liveness: dict = field(default_factory=dict, repr=False, compare=False)  # input names -> liveness(...)

    def liveness(self, inputs: Iterable[str]) -> tuple[set[str], list[set[str]]]:
        """`liveness(self.program, inputs)`, computed once per set of input names."""
        key = frozenset(inputs)
        if key not in self._liveness:
            self._liveness[key] = liveness(self.program, key)
        return self._liveness[key]


def typecheck(
    program: Program,
    inputs: Mapping[str, StreamType],
    fns: Mapping[str, StepFn],
    binding: Mapping[str, int] | None = None,
) -> list[StreamType]:
    """The types of the returned streams; raises StepTypeError on the first broken rule."""
    return typecheck_program(program, inputs, fns, binding).outputs


def typecheck_program(
    program: Program,
    inputs: Mapping[str, StreamType],
    fns: Mapping[str, StepFn],
    binding: Mapping[str, int] | None = None,
) -> TypedProgram:
    """Like `typecheck`, keeping every operator's resolved types for the interpreters."""
    ctx = TypeContext(fns=fns, binding=dict(binding or {}))
    env: dict[str, Any] = dict(inputs)
    typed: list[TypedStatement] = []
    outputs: list[StreamType] = []
    for st in program.statements:
        ts = TypedStatement(st)
        if isinstance(st, Apply):
            arg_type = _arg_type(st.arg, env, st.line, st.call.brief())
            op = _typed_op(st.call, arg_type, ctx)
            ts.ops.append(op)
            _bind_targets(st, op.out_type, env)
        elif isinstance(st, FnList):
            for name in st.fns:
                if name not in fns:
                    raise StepTypeError(f"{name} is not a fn of this task (its fns: {', '.join(sorted(fns))})", st.line)
            env[st.target] = FnListType(st.fns)
        elif isinstance(st, Comprehension):
            items = _comprehension_items(st, env, fns)
            results = []
            for local_env, fn_vars in items:
                arg_type = _arg_type(st.arg, local_env, st.line, st.call.brief())
                item_ctx = TypeContext(fns, ctx.binding, fn_vars, ctx.dyn_bounds, ctx._counter)
                op = _typed_op(st.call, arg_type, item_ctx)
                ctx._counter = item_ctx._counter
                if not isinstance(op.out_type, StreamType):
                    raise StepTypeError(f"{st.call.brief()}: in a list comprehension an operator must produce one stream", st.line)
                ts.ops.append(op)
                results.append(op.out_type)
            env[st.target] = StreamList(tuple(results))
        elif isinstance(st, Return):
            for name in st.names:
                value = _lookup(name, env, st.line, "return")
                if not isinstance(value, StreamType):
                    raise StepTypeError(f"return: {name} is not a stream", st.line)
                outputs.append(value)
        typed.append(ts)
    return TypedProgram(program, typed, outputs, ctx.dyn_bounds)


def _typed_op(call: OpCall, arg_type, ctx: TypeContext) -> TypedOp:
    params = resolve_params(call, ctx)
    return TypedOp(call, params, arg_type, infer(call, arg_type, params, ctx))


def _lookup(name: str, env: Mapping[str, Any], line: int, where: str):
    if name not in env:
        streams = ", ".join(n for n, v in env.items() if isinstance(v, StreamType)) or "none"
        raise StepTypeError(f"{where}: {name} is not defined (streams defined so far: {streams})", line)
    return env[name]


def _arg_type(arg, env, line, where: str):
    if isinstance(arg, str):
        value = _lookup(arg, env, line, where)
        if isinstance(value, FnListType):
            raise StepTypeError(f"{where}: {arg} is a list of fns, not a stream", line)
        return value
    return tuple(_arg_type(a, env, line, where) for a in arg)


def _bind_targets(st: Apply, out, env):
    if st.unpack:
        outs = out if isinstance(out, list) else [out]
        if len(outs) != len(st.targets):
            raise StepTypeError(f"{st.call.brief()}: produces {len(outs)} stream(s), unpacked into {len(st.targets)} names", st.line)
        env.update(zip(st.targets, outs))
    else:
        env[st.targets[0]] = StreamList(tuple(out)) if isinstance(out, list) else out
        if st.call.op == "Copy":
            raise StepTypeError("Copy produces two streams: unpack them, e.g. a, b = step.Copy().apply(x)", st.line)


def _comprehension_items(st: Comprehension, env, fns):
    lists = []
    for it in st.iterables:
        if isinstance(it, tuple):
            for name in it:
                if name not in fns:
                    raise StepTypeError(f"{st.call.brief()}: {name} is not a fn of this task (its fns: {', '.join(sorted(fns))})", st.line)
            lists.append(FnListType(it))
        else:
            value = _lookup(it, env, st.line, st.call.brief())
            if not isinstance(value, (StreamList, FnListType)):
                raise StepTypeError(f"{st.call.brief()}: {it} is not a list of streams or fns", st.line)
            lists.append(value)
    lengths = {len(v.items) if isinstance(v, StreamList) else len(v.fns) for v in lists}
    if len(lengths) != 1:
        raise StepTypeError(f"{st.call.brief()}: the lists zipped together have different lengths {sorted(lengths)}", st.line)
    items = []
    for i in range(lengths.pop()):
        local = dict(env)
        fn_vars = {}
        for var, value in zip(st.loop_vars, lists):
            if isinstance(value, StreamList):
                local[var] = value.items[i]
            else:
                fn_vars[var] = value.fns[i]
                local.pop(var, None)
        items.append((local, fn_vars))
    return items


# ---------------------------------------------------------------------------


def _reads(st) -> set[str]:
    """The environment names a statement reads (a comprehension's loop variables are its own)."""
    if isinstance(st, Apply):
        return set(arg_names(st.arg))
    if isinstance(st, Comprehension):
        return {it for it in st.iterables if isinstance(it, str)} | (set(arg_names(st.arg)) - set(st.loop_vars))
    if isinstance(st, Return):
        return set(st.names)
    return set()


def _defines(st) -> tuple[str, ...]:
    if isinstance(st, Apply):
        return st.targets
    if isinstance(st, (FnList, Comprehension)):
        return (st.target,)
    return ()


def liveness(program: Program, inputs: Iterable[str]) -> tuple[set[str], list[set[str]]]:
    """What to drop when: (inputs no statement reads, per statement the names dead after it).

    A value is dead after its last read before the name is re-assigned; a
    value that is never read (a dead stream) is dead right after the
    statement that made it.
    """
    live: set[str] = set()
    drops: list[set[str]] = []
    for st in reversed(program.statements):
        reads, defs = _reads(st), set(_defines(st))
        drops.append((reads | defs) - live)
        live = (live - defs) | reads
    drops.reverse()
    return set(inputs) - live, drops


def _elements(stype, bounds, call: OpCall | None) -> int:
    if isinstance(stype, StreamList):
        return sum(_elements(item, bounds, call) for item in stype.items)
    if not isinstance(stype, StreamType):
        return 0  # a list of fn names
    return sum(math.prod(shape) for shape in _tensor_shapes(stype, bounds, call))


def check_resources(typed: TypedProgram, binding: Mapping[str, int], max_elements: int,
                    max_live_elements: int | None = None, inputs: Mapping[str, StreamType] | None = None) -> None:
    """Raise ResourceError if a stream would exceed `max_elements`, or the live streams together `max_live_elements`
    (default `LIVE_FACTOR * max_elements`).

    Dynamic route sizes count at their upper bounds, so this sees every size
    before anything is allocated. The live streams at a statement are those
    that `liveness` keeps (the engines drop the others) plus what it makes.
    """
    bounds = dict(binding)
    for name, bound in typed.dyn_bounds.items():
        bounds[name] = _evaluate(bound, bounds, None, "a route size")
    limit = format_int(max_elements, grouped=True)
    sizes = [[[_elements(out, bounds, op.call) for out in _outs(op)] for op in ts.ops] for ts in typed.statements]
    for ts, per_op in zip(typed.statements, sizes):
        for op, outs in zip(ts.ops, per_op):
            for out, total in zip(_outs(op), outs):
                if total > max_elements:
                    raise ResourceError(
                        f"{op.call.brief()} would make a stream {out} of {format_int(total, grouped=True)} "
                        f"elements (limit {limit})", op.call.line)
    if max_live_elements is None:
        max_live_elements = LIVE_FACTOR * max_elements
    unread, drops = typed.liveness(inputs or {})
    held = {name: _elements(t, bounds, None) for name, t in (inputs or {}).items() if name not in unread}
    for ts, per_op, drop in zip(typed.statements, sizes, drops):
        made = _made(ts, per_op)
        total = sum(held.values()) + sum(made.values())
        if total > max_live_elements:
            raise ResourceError(
                f"the streams alive at this statement would hold {format_int(total, grouped=True)} elements together "
                f"(limit {format_int(max_live_elements, grouped=True)}); a stream's memory is freed after its last use",
                ts.stmt.line)
        held.update(made)
        for name in drop:
            held.pop(name, None)


def _outs(op: TypedOp) -> list:
    return op.out_type if isinstance(op.out_type, list) else [op.out_type]


def _made(ts: TypedStatement, per_op: list[list[int]]) -> dict[str, int]:
    """The elements of each value a statement binds (a comprehension's whole list, both halves of a Copy),
    from the element counts of each op's outputs."""
    st = ts.stmt
    if isinstance(st, Apply):
        return dict(zip(st.targets, per_op[0])) if st.unpack else {st.targets[0]: sum(per_op[0])}
    if isinstance(st, Comprehension):  # each item is one stream (the type check refuses multi-output ops here)
        return {st.target: sum(sum(outs) for outs in per_op)}
    return {}


def _tensor_shapes(stype: StreamType, binding, call: OpCall | None):
    try:
        return stype.tensor_shapes(binding)
    except ValueError as exc:
        where = call.brief() if call else "an input"
        raise StepRuntimeError(f"{where}: shape {format_shape(stype.shape)}: {exc}", call.line if call else None) from None


def _evaluate(dim, binding, call, what):
    try:
        return dim.evaluate(binding)
    except ValueError as exc:
        raise StepRuntimeError(f"{what}: {exc}", call.line if call else None) from None


def run_program(
    program: Program,
    inputs: Mapping[str, Stream],
    fns: Mapping[str, StepFn],
    binding: Mapping[str, int],
    engine: str = "vectorised",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_live_elements: int | None = None,
) -> list[Stream]:
    """Run `program` on `inputs`; returns the returned streams as tensors.

    `max_elements` bounds each stream, `max_live_elements` (default
    LIVE_FACTOR * max_elements) all the streams alive at once.
    """
    binding = dict(binding)
    input_types = {n: s.type for n, s in inputs.items()}
    checked = _checked_program(program, input_types, fns, binding)
    _check_inputs(inputs, binding)
    limits = (max_elements, max_live_elements)
    if limits not in checked.within:
        check_resources(checked.typed, binding, max_elements, max_live_elements, input_types)
        checked.within.add(limits)
    return _engine(engine).run(checked.typed, inputs, binding)


@dataclass
class _Checked:
    program: Program
    statements: tuple
    fns: dict
    typed: TypedProgram
    within: set = field(default_factory=set)  # (stream, live) element limits check_resources passed


_CHECKED: "OrderedDict[tuple, _Checked]" = OrderedDict()
_MAX_CHECKED = 256


def _checked_program(program: Program, input_types: Mapping[str, StreamType], fns: Mapping[str, StepFn],
                     binding: Mapping[str, int]) -> _Checked:
    """`typecheck_program`, remembered per (program, input types, fns, binding) for repeated runs.

    The entry holds the program and fns it was made for, so it is used only for
    those very objects, and only while the program's statements are unchanged.
    Failures are not remembered: they raise again each time.
    """
    try:
        key = (id(program), tuple(sorted(input_types.items())), tuple(sorted((n, id(f)) for n, f in fns.items())),
               tuple(sorted(binding.items())))
        hash(key)
    except TypeError:  # an unhashable type or binding value: no caching
        return _Checked(program, (), dict(fns), typecheck_program(program, input_types, fns, binding))
    hit = _CHECKED.get(key)
    if hit is not None and hit.program is program and hit.statements == tuple(program.statements) \
            and all(hit.fns.get(n) is f for n, f in fns.items()):
        _CHECKED.move_to_end(key)
        return hit
    checked = _Checked(program, tuple(program.statements), dict(fns), typecheck_program(program, input_types, fns, binding))
    _CHECKED[key] = checked
    while len(_CHECKED) > _MAX_CHECKED:
        _CHECKED.popitem(last=False)
    return checked


def prepare_run(
    program: Program,
    input_types: Mapping[str, StreamType],
    fns: Mapping[str, StepFn],
    binding: Mapping[str, int],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_live_elements: int | None = None,
) -> TypedProgram:
    """The type check and resource check of `run_program`, without tensors.

    The result depends only on its arguments, so a caller running one program
    on many inputs of the same types and binding (the verifier's seeds) does
    this once and calls `run_typed` for each.
    """
    typed = typecheck_program(program, input_types, fns, dict(binding))
    check_resources(typed, binding, max_elements, max_live_elements, dict(input_types))
    return typed


def run_typed(typed: TypedProgram, inputs: Mapping[str, Stream], binding: Mapping[str, int],
              engine: str = "vectorised") -> list[Stream]:
    """Run a program `prepare_run` checked on inputs of the types it was checked with."""
    binding = dict(binding)  # the engine binds route sizes in it
    _check_inputs(inputs, binding)
    return _engine(engine).run(typed, inputs, binding)


@functools.lru_cache(maxsize=1024)
def _input_shapes(stype: StreamType, binding: tuple) -> list[tuple[int, ...]]:
    return _tensor_shapes(stype, dict(binding), None)


def _check_inputs(inputs: Mapping[str, Stream], binding: Mapping[str, int]) -> None:
    items = tuple(sorted(binding.items()))
    for name, stream in inputs.items():
        try:
            expected = _input_shapes(stream.type, items)
        except TypeError:  # an unhashable binding value: not remembered
            expected = _tensor_shapes(stream.type, binding, None)
        got = [tuple(t.shape) for t in stream.field_tensors()]
        if got != expected:
            raise StepRuntimeError(f"input {name}: tensor shape {got} does not match its type {stream.type} ({expected})")


ENGINES: Registry = Registry("engine", {"vectorised": "stepforge.simulator.vectorised:VectorisedEngine",
                                        "naive": "stepforge.simulator.naive:NaiveEngine"})


def _engine(name: str):
    return ENGINES.create(name)


class Engine(ABC):
    """Walks a typed program; subclasses say how each operator computes."""

    @abstractmethod
    def load(self, stream: Stream, binding):
        """An input stream in the engine's own representation."""

    @abstractmethod
    def unload(self, value, stype: StreamType, binding) -> Stream:
        """A returned value back as a Stream of tensors."""

    @abstractmethod
    def execute(self, op: TypedOp, arg, binding: dict):
        """One operator application on engine values."""

    def run(self, typed: TypedProgram, inputs: Mapping[str, Stream], binding: dict) -> list[Stream]:
        unread, drops = typed.liveness(inputs)
        env: dict[str, Any] = {name: self.load(s, binding) for name, s in inputs.items() if name not in unread}
        for ts, drop in zip(typed.statements, drops):
            st = ts.stmt
            if isinstance(st, Apply):
                out = self._execute(ts.ops[0], _gather(st.arg, env), binding)
                if st.unpack:
                    env.update(zip(st.targets, out))
                else:
                    env[st.targets[0]] = out
            elif isinstance(st, FnList):
                env[st.target] = list(st.fns)
            elif isinstance(st, Comprehension):
                lists = [list(it) if isinstance(it, tuple) else env[it] for it in st.iterables]
                results = []
                for i, op in enumerate(ts.ops):
                    local = dict(env)
                    for var, values in zip(st.loop_vars, lists):
                        local[var] = values[i]
                    results.append(self._execute(op, _gather(st.arg, local), binding))
                env[st.target] = results
            elif isinstance(st, Return):
                return [self.unload(env[n], t, binding) for n, t in zip(st.names, typed.outputs)]
            for name in drop:  # a value is freed after its last use
                env.pop(name, None)
        raise AssertionError("a parsed program ends with return")

    def _execute(self, op: TypedOp, arg, binding):
        try:
            return self.execute(op, arg, binding)
        except StepRuntimeError as exc:
            if exc.line is None:
                raise StepRuntimeError(f"{op.call.brief()}: {exc.message}", op.call.line) from None
            raise


def _gather(arg, env):
    if isinstance(arg, str):
        return env[arg]
    return tuple(_gather(a, env) for a in arg)
