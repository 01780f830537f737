"""The verifier, part 1: everything a candidate cannot influence, prepared once per task and cached.

Per task (keyed by its content fingerprint, so an edited task file is a new
key): the types and compiled oracles (`_Prepared`); per size binding, the
namespace `global` built and the task's fns (`_BindingData`, which also keeps
open candidates' fns by their builder's key); per (binding, seed), the
inputs, parameters, float64 oracle outputs and elementwise tolerances
(`_SeedData`). The entries live in a BoundedLRU (benchmark/cache.py): at most
`_MAX_TASKS` tasks and `_MAX_BYTES` bytes of tensors. Task-side failures
raise TaskFileError. The tolerance rule is in verifier.py's docstring.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

from stepforge import simulator as sim
from stepforge.benchmark.cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, BoundedLRU, tensor_bytes
from stepforge.benchmark.schema import MultihotGen, Task, TaskFileError
from stepforge.simulator.errors import format_int
from stepforge.simulator.fns import build_namespace, namespace_binding
from stepforge.simulator.shapes import DEFAULT_SIZES, format_shape

EPS32 = float(torch.finfo(torch.float32).eps)
TOL_FACTOR = 8.0
DEV32_FACTOR = 4.0
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_MAX_ELEMENTS = 2**27

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
    open_fns: "OrderedDict[Any, Mapping[str, sim.StepFn]]" = field(default_factory=OrderedDict)  # builder key ->

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
