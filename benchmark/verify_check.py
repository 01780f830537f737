"""The verifier, part 2: checking a program against a prepared task (types, then values), and its fns.

The static check types the program at the default sizes and compares its
returned streams' arity, dtypes and shapes with the task's outputs; each
further binding is type- and resource-checked once. `_check_values` compares
one run's outputs with the cached oracle within the cached tolerances and
names the worst element. `_CandidateFns` gives the fns a program runs with:
the task's, or an open candidate's (built once per binding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from stepforge import simulator as sim
from stepforge.benchmark.schema import Task
from stepforge.benchmark.verify_data import (
    _binding_data,
    _BindingData,
    _fmt_shapes,
    _one_line,
    _Prepared,
    _SeedData,
    _unravel,
)
from stepforge.simulator import interpreter
from stepforge.simulator.shapes import format_shape

# A binding's namespace -> fns by func_name. A builder with a hashable `key` attribute (the
# candidate's fns, see open_mode.fn_builder) has what it builds kept per binding in the task's
# cache entry, for the last `_MAX_OPEN_FNS` keys: a candidate's fns are built once per binding.
FnBuilder = Callable[[dict], Mapping[str, sim.StepFn]]
_MAX_OPEN_FNS = 16


# ---------------------------------------------------------------------------
# comparison


@dataclass
class _Mismatch:
    message: str


def _axis_labels(stype: sim.StreamType, field: int) -> list[str]:
    leaf = stype.fields()[field]
    return [str(d) for d in reversed(stype.shape)] + [str(d) for d in leaf.elem_dims()]


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

    A candidate's fns are built by `builder` once per binding, from that
    binding's cached namespace, so they read the parameters of whichever seed
    is loaded into it; with a builder `key`, they are kept in the binding's
    cache entry for later verifications of the same fns (see `FnBuilder`).
    """

    def __init__(self, builder: Optional[FnBuilder]):
        self.builder = builder
        self._built: dict[tuple, Mapping[str, sim.StepFn]] = {}  # sorted binding items ->

    def of(self, bd: _BindingData) -> Mapping[str, sim.StepFn]:
        if self.builder is None:
            return bd.fns
        key = getattr(self.builder, "key", None)
        if key is not None:
            fns = bd.open_fns.get(key)
            if fns is None:
                fns = bd.open_fns[key] = self.builder(bd.ns)
                if len(bd.open_fns) > _MAX_OPEN_FNS:
                    bd.open_fns.popitem(last=False)
            else:
                bd.open_fns.move_to_end(key)
            return fns
        binding = tuple(sorted(bd.binding.items()))
        fns = self._built.get(binding)
        if fns is None:
            fns = self._built[binding] = self.builder(bd.ns)
        return fns
