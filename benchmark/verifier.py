"""The verifier: is a STeP program a correct solution of a task (docs/benchmark.md)?

`verify(task, impl)` checks, in this order, and stops at the first failure:

    fns      (open mode only, `verify(..., fns=builder)`) the candidate's fns
             build: inside the fn language and vocabulary, valid declared types
    parse    the text is in the STeP language (never exec'd)
    type     it type-checks against the task's inputs and fns
    affine   every stream is consumed at most once (see below)
    arity    it returns as many streams as the task has outputs
    dtype    each returned stream has the declared element type
    shape    ... and the declared symbolic shape
    value    for every (size binding, input seed), every field matches the
             float64 oracle within a float32-sound tolerance

The static stages (parse to shape) run once per program; the value stage once
per (binding, seed): by default the default sizes and each binding the task
declares, with seeds 0, 1, 2. The program is type-checked once per binding
(the static check's is reused for the defaults) and the first failing run
ends the verification. Failures while running are `resource` (a tensor
would exceed `max_elements`, or the streams alive at once twice that;
checked before allocating) or `runtime`.

What a candidate cannot influence (fns, inputs, parameters, oracle outputs,
tolerances) is computed once per process and task and kept in a bounded LRU;
see "per-task preparation" below, and `verify(..., cache=False)`.
`timeout` is given by the worker pool (benchmark/pool.py), which runs this
module in worker processes with a time limit.

The affine rule does not stop the functional stages: a program that breaks it
gets stage `affine` (not passed) but `functional_ok` says whether its numbers
are right, so baselines without a guardian can be scored on function alone.
With `check_affine=False` such a program passes and `affine_ok` is False.

Tolerance. The oracle runs in float64 (inputs cast to float64, the default
dtype set to float64 while it runs); the candidate runs in float32. A field
passes when, elementwise, |got - ref| <= atol + rtol * |ref| with

    rtol = C * eps32 * sqrt(L)
    atol = rtol * max|ref| + 4 * dev32

where eps32 = 2**-23, C = 8, L = the largest size in the binding (an upper
bound on the length of any single-dim reduction, whose float32 rounding error
grows like sqrt(L) for the random inputs the benchmark draws) and dev32 the
largest deviation of the same oracle evaluated in float32 from its float64
value (an empirical measure of how ill-conditioned the computation is, e.g.
a softmax of large scores; it is 0 for well-conditioned tasks). At the default
sizes (L = 16) this allows about 3.8e-6 relative to the larger of the element
and the field's maximum: a 1e-3 relative error is 250 times over it, and a
dropped 1e-5 epsilon in a norm (about 1.5e-5 relative) is still caught, while
correct float32 programs stay well inside it at L = 512 (where a sequential
sum's typical relative error is about 0.3 * eps32 * sqrt(L)). A task's
`tolerance: {rtol, atol}` replaces the two numbers (absolute values).
An oracle must be finite: one that returns NaN or inf is a broken task.

Task-side failures (its `global`, data generation or oracle raise, an oracle
of the wrong shape, a binding that `global` contradicts) are not the
candidate's fault: they raise `TaskFileError` instead of returning a verdict.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from stepforge import simulator as sim
from stepforge.benchmark.cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, BoundedLRU, tensor_bytes
from stepforge.benchmark.schema import MultihotGen, Task, TaskFileError, resolve_task
from stepforge.benchmark.verdict import STAGES, Stage, Verdict
from stepforge.simulator import interpreter
from stepforge.simulator.errors import format_int
from stepforge.simulator.fns import build_namespace, namespace_binding
from stepforge.simulator.shapes import DEFAULT_SIZES, format_shape

EPS32 = float(torch.finfo(torch.float32).eps)
TOL_FACTOR = 8.0
DEV32_FACTOR = 4.0
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_MAX_ELEMENTS = 2**27

FnBuilder = Callable[[dict], Mapping[str, sim.StepFn]]  # a binding's namespace -> fns by func_name


# ---------------------------------------------------------------------------
# per-task preparation, cached per process (the pool's workers keep it warm)
#
# Everything a candidate cannot influence is computed once and kept in one
# entry per task (keyed by the task's content fingerprint, so an edited task
# file is a new key): the types and compiled oracles (`_Prepared`); per size
# binding, the namespace `global` built and the fns (`_BindingData`); per
# (binding, seed), the inputs, parameters, float64 oracle outputs and
# tolerances (`_SeedData`). The entries live in a BoundedLRU (benchmark/cache.py):
# at most `_MAX_TASKS` tasks and `_MAX_BYTES` bytes of tensors.


@dataclass
class _SeedData:
    inputs: dict[str, sim.Stream]
    input_data: dict  # inputs and parameters by name: what fns and oracles read
    refs: list[list[torch.Tensor]]  # float64, per output, per field
    dev32: list[list[float]]
    allowed: list[list[torch.Tensor]]  # the elementwise tolerance of each field
    ref_inf: list[list[torch.Tensor]]  # where each field's oracle is infinite
    setup_s: float


@dataclass
class _BindingData:
    binding: dict[str, int]
    ns: dict  # the globals of the fns; its `input_data` holds the seed being run
    fns: dict[str, sim.StepFn]
    seeds: dict[tuple[int, int], _SeedData] = field(default_factory=dict)  # (seed, max_elements) ->

    def load(self, seed: _SeedData) -> None:
        """Point the fns' `input_data` at this seed's inputs and parameters."""
        data = self.ns["input_data"]
        data.clear()
        data.update(seed.input_data)


@dataclass
class _Prepared:
    task: Task
    key: str  # the task's fingerprint
    input_types: dict[str, sim.StreamType]
    output_types: list[sim.StreamType]
    oracles: list[list[tuple[Any, Any]]]  # per output, per field: (compiled body, compiled last expression)
    bindings: dict[tuple, _BindingData] = field(default_factory=dict)  # sorted partial binding items ->


_MAX_TASKS = DEFAULT_MAX_ENTRIES
_MAX_BYTES = DEFAULT_MAX_BYTES
_CACHE: BoundedLRU[_Prepared] = BoundedLRU(_MAX_TASKS, _MAX_BYTES)


def clear_caches() -> None:
    """Forget prepared tasks and cached inputs/oracles (tests; memory)."""
    _CACHE.clear()


def cache_stats() -> dict[str, int]:
    """The verifier cache's entries, bytes, hits, misses and evictions (this process)."""
    return _CACHE.stats()


def _task_error(task: Task, key: str, message: str) -> TaskFileError:
    return TaskFileError(task.source, [(key, message)])


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _compile_block(code: str, label: str):
    tree = ast.parse(code, filename=label)
    last = tree.body[-1]
    body = ast.Module(body=tree.body[:-1], type_ignores=[])
    expr = ast.Expression(body=last.value)
    return compile(body, label, "exec"), compile(expr, label, "eval")


def _size_symbols(task: Task) -> tuple[str, ...]:
    """Every size symbol the task's dims and dtypes name, so `global` may write `ctx[H]`."""
    text = " ".join(
        f"{s.dtype} {s.dims}" for s in [*task.inputs, *task.parameters, *task.outputs]
    ) + " ".join(f"{f.input_dtype} {f.output_dtype}" for f in task.fns)
    names = set(re.findall(r"\b([A-Z][A-Za-z0-9_]*)\b", text)) - {"Buffer", "Multihot"}
    return tuple(sorted(names | {"M", "N", "K", "D", "E"}))


def _namespace(task: Task, binding: Mapping[str, int], input_data: dict, where: str = "global") -> dict:
    try:
        return build_namespace(dict(binding), input_data, task.global_code, symbols=_size_symbols(task))
    except Exception as exc:
        raise _task_error(task, where, f"raised {type(exc).__name__}: {_one_line(exc)}") from None


def _build_fns(task: Task, ns: dict) -> dict[str, sim.StepFn]:
    fns = {}
    for i, f in enumerate(task.fns):
        try:
            fns[f.func_name] = sim.make_fn(f.name, f.func_name, f.input_dtype, f.output_dtype, f.apply,
                                           f.init_list(), namespace=ns)
        except Exception as exc:
            raise _task_error(task, f"fns[{i}]", f"cannot build fn {f.func_name}: {_one_line(exc)}") from None
    return fns


def _stream_type(task: Task, decl, where: str) -> sim.StreamType:
    try:
        return sim.StreamType(sim.parse_dtype(decl.dtype), sim.parse_dims(decl.dims))
    except ValueError as exc:
        raise _task_error(task, where, _one_line(exc)) from None


def _prepare(task: Task, cache: BoundedLRU[_Prepared]) -> _Prepared:
    key = task.fingerprint()
    return cache.get(key, lambda: _new_prepared(task, key))


def _new_prepared(task: Task, key: str) -> _Prepared:
    input_types = {d.name: _stream_type(task, d, f"inputs[{i}]") for i, d in enumerate(task.inputs)}
    output_types = [_stream_type(task, d, f"outputs[{i}]") for i, d in enumerate(task.outputs)]
    prepared = _Prepared(task, key, input_types, output_types, oracles=[])
    _binding_data(prepared, {})  # `global` and the fns at the default sizes: the static check's
    prepared.oracles = [[_compile_block(code, f"<oracle {o.name}[{j}]>") for j, code in enumerate(o.transforms())]
                        for o in task.outputs]
    return prepared


def _binding_data(prepared: _Prepared, partial: Mapping[str, int]) -> _BindingData:
    """The namespace and fns of one partial binding, built once per task."""
    key = tuple(sorted((str(k), int(v)) for k, v in partial.items()))
    data = prepared.bindings.get(key)
    if data is None:
        ns, binding = _resolve_binding(prepared.task, partial)
        data = _BindingData(binding, ns, _build_fns(prepared.task, ns))
        prepared.bindings[key] = data
    return data


# ---------------------------------------------------------------------------
# inputs and oracle for one (binding, seed)


def _generate(task: Task, decl, stype: sim.StreamType, binding: Mapping[str, int], gen: torch.Generator,
              where: str, max_elements: int) -> Union[torch.Tensor, list[torch.Tensor]]:
    try:
        shapes = stype.tensor_shapes(binding)
    except ValueError as exc:
        raise _task_error(task, where, f"cannot size {format_shape(stype.shape)}: {_one_line(exc)}") from None
    total = sum(math.prod(s) for s in shapes)
    if total > max_elements:
        raise sim.ResourceError(f"{decl.name} would have {format_int(total, grouped=True)} elements for this binding "
                                f"(limit {format_int(max_elements, grouped=True)})")
    tensors = []
    for shape, _field in zip(shapes, stype.fields()):
        spec = decl.data_gen
        if isinstance(spec, MultihotGen):
            width = shape[-1]
            if spec.max > width:
                raise _task_error(task, f"{where}.data_gen", f"max={spec.max} ones but the Multihot has {width} routes")
            positions = math.prod(shape[:-1])
            counts = torch.randint(spec.min, spec.max + 1, (positions, 1), generator=gen)
            ranks = torch.rand((positions, width), generator=gen).argsort(dim=-1).argsort(dim=-1)
            tensors.append((ranks < counts).to(torch.float32).reshape(shape))
        elif spec == "torch.rand":
            tensors.append(torch.rand(shape, generator=gen, dtype=torch.float32))
        elif spec == "torch.randn":
            tensors.append(torch.randn(shape, generator=gen, dtype=torch.float32))
        elif spec == "torch.ones":
            tensors.append(torch.ones(shape, dtype=torch.float32))
        elif spec == "binary":
            tensors.append((torch.rand(shape, generator=gen) < 0.5).to(torch.float32))
        else:  # the schema admits nothing else
            raise _task_error(task, f"{where}.data_gen", f"unknown data_gen {spec!r}")
    return tensors[0] if len(tensors) == 1 else tensors


def _eval_oracle(task: Task, prepared: _Prepared, ns: dict, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Every output's oracle blocks, in order, in one namespace: a later block may use what an earlier one defined."""
    refs = []
    scope = dict(ns)
    for i, (_out, blocks) in enumerate(zip(task.outputs, prepared.oracles)):
        fields = []
        for j, (body, expr) in enumerate(blocks):
            try:
                with _default_dtype(dtype):
                    exec(body, scope)  # task-file code, run in a worker
                    value = eval(expr, scope)
                fields.append(torch.as_tensor(value).to(dtype))
            except Exception as exc:
                raise _task_error(task, f"outputs[{i}].data_transform[{j}]",
                                  f"raised {type(exc).__name__}: {_one_line(exc)}") from None
        refs.append(fields)
    return refs


def oracle_function(task: Task):
    """The task's oracle, compiled once: `f(ns, dtype)` -> outputs, per output a list of field tensors.

    `ns` is a namespace `global` ran in (`fns.build_namespace`) with `input_data`
    filled; the oracle runs with `dtype` as torch's default dtype. For timing
    the oracle against the simulator (scripts/bench_simulator.py).
    """
    with _VERIFY_LOCK:
        prepared = _prepare(task, _CACHE)
    return lambda ns, dtype=torch.float32: _eval_oracle(task, prepared, ns, dtype)


def _resolve_binding(task: Task, partial: Mapping[str, int]) -> tuple[dict, dict[str, int]]:
    """Run `global` over the defaults updated by `partial`; the namespace and the full binding."""
    binding = {**DEFAULT_SIZES, **{str(k): int(v) for k, v in partial.items()}}
    input_data: dict = {}
    ns = _namespace(task, binding, input_data)
    full = namespace_binding(ns)
    for name, value in partial.items():
        if full.get(str(name)) != int(value):
            raise _task_error(task, "bindings", f"the binding sets {name}={value} but global sets {name}={full.get(str(name))}")
    return ns, full


def _seed_data(prepared: _Prepared, bd: _BindingData, seed: int, max_elements: int,
               cache: BoundedLRU[_Prepared]) -> _SeedData:
    """Inputs, parameters, oracle outputs and tolerances of one (binding, seed), computed once."""
    key = (int(seed), int(max_elements))
    if key in bd.seeds:
        return bd.seeds[key]
    task = prepared.task
    binding = bd.binding
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    input_data: dict = {}
    inputs = {}
    for i, d in enumerate(task.inputs):
        stype = prepared.input_types[d.name]
        data = _generate(task, d, stype, binding, gen, f"inputs[{i}]", max_elements)
        input_data[d.name] = data
        inputs[d.name] = sim.Stream(stype, data)
    for i, d in enumerate(task.parameters):
        stype = _stream_type(task, d, f"parameters[{i}]")
        input_data[d.name] = _generate(task, d, stype, binding, gen, f"parameters[{i}]", max_elements)
    bd.ns["input_data"].clear()
    bd.ns["input_data"].update(input_data)
    refs = _reference(task, prepared, binding, input_data)
    dev32 = _float32_deviation(task, prepared, bd.ns, input_data, refs)
    allowed, ref_inf = [], []
    for fields, devs in zip(refs, dev32):
        allowed.append([])
        ref_inf.append([])
        for ref, dev in zip(fields, devs):
            rtol, atol = tolerance_for(binding, ref, dev, task.tolerance)
            allowed[-1].append(atol + rtol * ref.abs())
            ref_inf[-1].append(torch.isinf(ref))
    seed_data = _SeedData(inputs, input_data, refs, dev32, allowed, ref_inf, time.perf_counter() - t0)
    bd.seeds[key] = seed_data
    cache.grew(prepared.key, tensor_bytes([*input_data.values(), *refs, *allowed, *ref_inf]))
    return seed_data


def _as_fields(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _reference(task: Task, prepared: _Prepared, binding: dict[str, int], input_data: dict) -> list[list[torch.Tensor]]:
    data64 = {k: [t.double() for t in v] if isinstance(v, list) else v.double() for k, v in input_data.items()}
    with _default_dtype(torch.float64):
        ns64 = _namespace(task, binding, data64)
    refs = _eval_oracle(task, prepared, ns64, torch.float64)
    for i, (out, stype, fields) in enumerate(zip(task.outputs, prepared.output_types, refs)):
        expected = stype.tensor_shapes(binding)
        got = [tuple(t.shape) for t in fields]
        if got != expected:
            raise _task_error(task, f"outputs[{i}].data_transform",
                              f"the oracle of {out.name} has shape {_fmt_shapes(got)}, its dtype and dims need {_fmt_shapes(expected)}")
        for j, ref in enumerate(fields):
            bad = ~torch.isfinite(ref)
            if bool(bad.any()):
                at = _unravel(int(bad.reshape(-1).nonzero()[0]), tuple(ref.shape))
                raise _task_error(task, f"outputs[{i}].data_transform[{j}]",
                                  f"the oracle of {out.name} returned {int(bad.sum())} NaN or infinite value(s) "
                                  f"(the first {float(ref[at]):g} at index {at}); expected finite values")
    return refs


def _float32_deviation(task: Task, prepared: _Prepared, ns: dict, input_data: dict,
                       refs: list[list[torch.Tensor]]) -> list[list[float]]:
    """max |oracle(float32) - oracle(float64)| per field; 0 where the float32 oracle cannot run."""
    copies = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in input_data.items()}
    scope = dict(ns)
    scope["input_data"] = copies
    try:
        refs32 = _eval_oracle(task, prepared, scope, torch.float32)
    except TaskFileError:
        return [[0.0] * len(f) for f in refs]
    out = []
    for fields64, fields32 in zip(refs, refs32):
        devs = []
        for r64, r32 in zip(fields64, fields32):
            if r64.shape != r32.shape:
                devs.append(0.0)
                continue
            diff = (r32.double() - r64).abs()
            finite = torch.isfinite(diff)
            devs.append(float(diff[finite].max()) if bool(finite.any()) else 0.0)
        out.append(devs)
    return out


def _fmt_shapes(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


# ---------------------------------------------------------------------------
# comparison


@dataclass
class _Mismatch:
    message: str


def _axis_labels(stype: sim.StreamType, field: int) -> list[str]:
    leaf = stype.fields()[field]
    return [str(d) for d in reversed(stype.shape)] + [str(d) for d in leaf.elem_dims()]


def tolerance_for(binding: Mapping[str, int], ref: torch.Tensor, dev32: float = 0.0,
                  override: Optional[Any] = None) -> tuple[float, float]:
    """(rtol, atol) for one field; see the module docstring."""
    sizes = [int(v) for v in binding.values()] or [1]
    rtol = TOL_FACTOR * EPS32 * math.sqrt(max(max(sizes), 1))
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    atol = rtol * scale + DEV32_FACTOR * dev32
    if override is not None:
        rtol = override.rtol if override.rtol is not None else rtol
        atol = override.atol if override.atol is not None else atol
    return rtol, atol


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _compare_field(name: str, stype: sim.StreamType, field: int, got: torch.Tensor, ref: torch.Tensor,
                   allowed: torch.Tensor, ref_inf: torch.Tensor) -> Optional[_Mismatch]:
    """None if `got` is within `allowed` of `ref` everywhere (infinities matched exactly)."""
    label = name if len(stype.fields()) == 1 else f"{name} field {field}"
    got64 = got.detach().to("cpu", torch.float64)
    err = (got64 - ref).abs()
    ok = err <= allowed
    if bool(ok.all()):
        return None
    ok = ok | (ref_inf & (got64 == ref))
    if bool(ok.all()):
        return None
    bad = ~ok
    n_bad = int(bad.sum())
    score = torch.where(bad, torch.nan_to_num(err, nan=math.inf, posinf=math.inf) / allowed.clamp_min(1e-300),
                        torch.zeros_like(err))
    flat = int(torch.argmax(torch.nan_to_num(score, nan=math.inf)).item())
    index = _unravel(flat, tuple(ref.shape))
    labels = _axis_labels(stype, field)
    where = "(" + ", ".join(f"{a}={i}" for a, i in zip(labels, index)) + ")" if index else "(the scalar)"
    g, r = float(got64.reshape(-1)[flat]), float(ref.reshape(-1)[flat])
    e, tol = float(err.reshape(-1)[flat]), float(allowed.reshape(-1)[flat])
    return _Mismatch(f"{label}: {n_bad} of {ref.numel()} values differ from the expected output; worst at {where}: "
                     f"got {g:.7g}, expected {r:.7g} (|error| {e:.2g} > tolerance {tol:.2g})")


def _check_values(prepared: _Prepared, outs: list[sim.Stream], binding: Mapping[str, int],
                  run: _SeedData) -> Optional[tuple[str, str]]:
    """None if every field matches; else (stage, message)."""
    task = prepared.task
    for i, (decl, stype, stream) in enumerate(zip(task.outputs, prepared.output_types, outs)):
        fields = stream.field_tensors()
        expected = [tuple(t.shape) for t in run.refs[i]]  # the oracle's shapes are checked against the type
        got_shapes = [tuple(t.shape) for t in fields]
        if got_shapes != expected:
            return "shape", (f"{decl.name}: the program produced tensors of shape {_fmt_shapes(got_shapes)}, "
                             f"its type needs {_fmt_shapes(expected)}")
        for j, (got, ref) in enumerate(zip(fields, run.refs[i])):
            mismatch = _compare_field(decl.name, stype, j, got, ref, run.allowed[i][j], run.ref_inf[i][j])
            if mismatch is not None:
                return "value", mismatch.message
    return None


# ---------------------------------------------------------------------------
# verify


def resolve_bindings(task: Task, bindings: Optional[Iterable[Mapping[str, int]]] = None) -> list[dict[str, int]]:
    """The partial bindings a verification runs: `{}` (the defaults) and the task's, unless given."""
    if bindings is None:
        out = [{}] + [dict(b) for b in task.bindings]
    else:
        out = [dict(b) for b in bindings]
    unique = []
    for b in out:
        if b not in unique:
            unique.append(b)
    return unique or [{}]


def _fmt_binding(binding: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in binding.items())


def _static_check(prepared: _Prepared, program, fns: Mapping[str, sim.StepFn]) -> tuple[Optional[tuple[str, str]], Any]:
    """Types, arity, dtype, shape of the returned streams at the default sizes, with the fns of the defaults.

    (None, the typed program) when they are right, else ((stage, message), None).
    """
    problem, typed = _static_types(prepared, program, fns)
    if problem is None:
        problem = _output_types_problem(prepared, typed.outputs)
    return problem, (typed if problem is None else None)


def _static_types(prepared: _Prepared, program, fns: Mapping[str, sim.StepFn]) -> tuple[Optional[tuple[str, str]], Any]:
    defaults = _binding_data(prepared, {})
    try:
        return None, interpreter.typecheck_program(program, prepared.input_types, fns, defaults.binding)
    except sim.StepTypeError as exc:
        return ("type", exc.message), None
    except sim.SimulatorError as exc:
        return ("type", exc.message), None
    except Exception as exc:  # the type checker itself failed on this program: still the program's verdict
        return ("type", f"the type checker failed on this program: {type(exc).__name__}: {_one_line(exc)}"), None


def _output_types_problem(prepared: _Prepared, out_types: list[sim.StreamType]) -> Optional[tuple[str, str]]:
    expected = prepared.output_types
    names = [o.name for o in prepared.task.outputs]
    if len(out_types) != len(expected):
        wanted = ", ".join(f"{n}: {t}" for n, t in zip(names, expected))
        return "arity", f"the program returns {len(out_types)} stream(s); the task expects {len(expected)} ({wanted})"
    for i, (got, exp) in enumerate(zip(out_types, expected)):
        if got.elem != exp.elem:
            return "dtype", f"output {i} ({names[i]}) has elements of type {got.elem}; expected {exp.elem}"
    for i, (got, exp) in enumerate(zip(out_types, expected)):
        if tuple(got.shape) != tuple(exp.shape):
            return "shape", f"output {i} ({names[i]}) has shape {format_shape(got.shape)}; expected {format_shape(exp.shape)}"
    return None


def _typed_for(program, prepared: _Prepared, bd: _BindingData, fns: Mapping[str, sim.StepFn],
               partial: Mapping[str, int], static_typed, max_elements: int):
    """The program type-checked and resource-checked for one binding (the static check's at the defaults)."""
    if not partial and static_typed is not None:
        interpreter.check_resources(static_typed, bd.binding, max_elements, inputs=prepared.input_types)
        return static_typed
    return interpreter.prepare_run(program, prepared.input_types, fns, bd.binding, max_elements)


class _CandidateFns:
    """The fns a program runs with, per binding: the task's, or (open mode) the candidate's.

    A candidate's fns are built by `builder` once per binding of one
    verification, from that binding's cached namespace, so they read the
    parameters of whichever seed is loaded into it.
    """

    def __init__(self, builder: Optional[FnBuilder]):
        self.builder = builder
        self._built: dict[tuple, Mapping[str, sim.StepFn]] = {}  # sorted binding items ->

    def of(self, bd: _BindingData) -> Mapping[str, sim.StepFn]:
        if self.builder is None:
            return bd.fns
        key = tuple(sorted(bd.binding.items()))
        fns = self._built.get(key)
        if fns is None:
            fns = self._built[key] = self.builder(bd.ns)
        return fns



def verify(
    task: Union[Task, str, Path],
    impl_text: Optional[str] = None,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    bindings: Optional[Iterable[Mapping[str, int]]] = None,
    engine: str = "vectorised",
    check_affine: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    cache: bool = True,
    fns: Optional[FnBuilder] = None,
) -> Verdict:
    """Verify `impl_text` (default: the task's reference `impl`) against `task`.

    `fns` (open mode, see benchmark/open_mode.py) builds the fns the program
    runs with, in place of the task's, from a binding's namespace; a failure
    to build them is the verdict's `fns` stage. Inputs, oracles and tolerances
    come from the same cache as in closed mode.

    `task` is a Task, a benchmark key (`norm/G_0_8_01`) or a task file path.
    `bindings`: partial size bindings over the defaults (`[{"D": 8}]`); None
    runs the defaults and every binding the task declares. Raises
    TaskFileError when the task itself is broken (see the module docstring).
    `cache=False` computes the task's inputs, oracles and fns afresh for this
    call (they are still computed once within it) instead of using and
    filling the process-wide cache; verdicts are the same either way.
    """
    if not isinstance(task, Task):
        task = resolve_task(task)
    with _VERIFY_LOCK:  # the caches and torch's default dtype (set while an oracle runs) are process-wide
        store = _CACHE if cache else BoundedLRU(1, _MAX_BYTES)
        return _verify(task, impl_text, seeds, bindings, engine, check_affine, max_elements, store,
                       _CandidateFns(fns))


_VERIFY_LOCK = threading.RLock()


def _verify(task: Task, impl_text: Optional[str], seeds: Sequence[int], bindings, engine: str,
            check_affine: bool, max_elements: int, cache: BoundedLRU[_Prepared], candidate: _CandidateFns) -> Verdict:
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("verify needs at least one seed")
    if impl_text is None:
        if not task.impl:
            raise ValueError(f"task {task.key} has no reference impl; pass the program to verify")
        impl_text = task.impl
    timings = {"parse": 0.0, "setup": 0.0, "run": 0.0, "check": 0.0}
    t_start = time.perf_counter()
    base = {"task": task.key}

    def done(**kw) -> Verdict:
        timings["total"] = time.perf_counter() - t_start
        return Verdict(timings={k: round(v, 6) for k, v in timings.items()}, **base, **kw)

    # -- static stages, once per program
    t0 = time.perf_counter()
    prepared = _prepare(task, cache)
    try:
        static_fns = candidate.of(_binding_data(prepared, {}))
    except (sim.SimulatorError, ValueError) as exc:
        timings["parse"] = time.perf_counter() - t0
        return done(passed=False, stage="fns", message=_one_line(exc), affine_ok=None, functional_ok=False)
    try:
        program = sim.parse_program(impl_text)
    except sim.ProgramSyntaxError as exc:
        timings["parse"] = time.perf_counter() - t0
        return done(passed=False, stage="parse", message=exc.message, affine_ok=None, functional_ok=False)
    violations = sim.check_affine(program)
    affine_ok = not violations
    affine_msg = ""
    if violations:
        affine_msg = violations[0].message + (f" (and {len(violations) - 1} more stream(s))" if len(violations) > 1 else "")
    static, static_typed = _static_check(prepared, program, static_fns)
    timings["parse"] = time.perf_counter() - t0
    if static is not None:
        stage, msg = static
        if stage == "type":
            return done(passed=False, stage="type", message=msg, affine_ok=affine_ok, functional_ok=False)
        if not affine_ok and check_affine:
            return done(passed=False, stage="affine", message=f"{affine_msg}; also fails {stage}: {msg}", affine_ok=False,
                        functional_ok=False)
        return done(passed=False, stage=stage, message=msg, affine_ok=affine_ok, functional_ok=False)

    # -- functional stage, per (binding, seed); each binding type-checked once
    runs = 0
    failure: Optional[dict] = None
    for partial in resolve_bindings(task, bindings):
        bd = _binding_data(prepared, partial)
        typed = None
        try:
            run_fns = candidate.of(bd)
        except (sim.SimulatorError, ValueError) as exc:  # a size of this binding the candidate's fns cannot take
            failure = dict(stage="fns", message=_one_line(exc), binding=dict(bd.binding), seed=int(seeds[0]))
            break
        for seed in seeds:
            t0 = time.perf_counter()
            try:
                run = _seed_data(prepared, bd, seed, max_elements, cache)
            except sim.ResourceError as exc:
                timings["setup"] += time.perf_counter() - t0
                failure = dict(stage="resource", message=exc.message, binding={**DEFAULT_SIZES, **partial},
                               seed=int(seed))
                break
            timings["setup"] += time.perf_counter() - t0
            where = {"binding": dict(bd.binding), "seed": int(seed)}
            t0 = time.perf_counter()
            try:
                if typed is None:
                    typed = _typed_for(program, prepared, bd, run_fns, partial, static_typed, max_elements)
                inputs = {n: sim.Stream(s.type, [t.clone() for t in s.data] if isinstance(s.data, list) else s.data.clone())
                          for n, s in run.inputs.items()}
                bd.load(run)
                outs = interpreter.run_typed(typed, inputs, bd.binding, engine=engine)
            except sim.ResourceError as exc:
                failure = dict(stage="resource", message=exc.message, **where)
            except MemoryError:
                failure = dict(stage="resource", message="the program ran out of memory", **where)
            except sim.StepTypeError as exc:
                failure = dict(stage="type", message=exc.message, **where)
            except sim.SimulatorError as exc:
                failure = dict(stage="runtime", message=exc.message, **where)
            except Exception as exc:  # a fn body or the engine failed in a way the simulator did not name
                failure = dict(stage="runtime", message=f"{type(exc).__name__}: {_one_line(exc)}", **where)
            timings["run"] += time.perf_counter() - t0
            if failure is not None:
                break
            t0 = time.perf_counter()
            problem = _check_values(prepared, outs, bd.binding, run)
            timings["check"] += time.perf_counter() - t0
            if problem is not None:
                failure = dict(stage=problem[0], message=problem[1], **where)
                break
            runs += 1
        if failure is not None:
            break

    if failure is not None and failure.get("binding"):
        failure["message"] += f" [sizes {_fmt_binding(failure['binding'])}, seed {failure['seed']}]"
    functional_ok = failure is None
    if not affine_ok and check_affine:
        msg = affine_msg if functional_ok else f"{affine_msg}; also fails {failure['stage']}: {failure['message']}"
        extra = {k: failure[k] for k in ("binding", "seed")} if failure else {}
        return done(passed=False, stage="affine", message=msg, affine_ok=False, functional_ok=functional_ok,
                    runs=runs, **extra)
    if failure is not None:
        return done(passed=False, affine_ok=affine_ok, functional_ok=False, runs=runs, **failure)
    n_bindings = len(resolve_bindings(task, bindings))
    msg = f"passed {runs} runs ({n_bindings} size binding(s) x {len(seeds)} seed(s))"
    if not affine_ok:
        msg += f"; affine rule not checked, broken: {affine_msg}"
    return done(passed=True, stage="ok", message=msg, affine_ok=affine_ok, functional_ok=True, runs=runs)


__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_SEEDS",
    "FnBuilder",
    "STAGES",
    "Stage",
    "Verdict",
    "cache_stats",
    "clear_caches",
    "oracle_function",
    "resolve_bindings",
    "tolerance_for",
    "verify",
]
