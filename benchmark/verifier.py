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
see benchmark/verify_data.py, and `verify(..., cache=False)`.
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

The code is in three modules by job: verify_data.py (per-task preparation,
inputs, oracles and tolerances, and their cache), verify_check.py (the static
checks, the value comparison, the fns a program runs with) and this one (the
public `verify`, running the stages in order).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from stepforge import simulator as sim
from stepforge.benchmark.cache import BoundedLRU
from stepforge.benchmark.schema import Task, resolve_task
from stepforge.benchmark.verdict import STAGES, Stage, Verdict
from stepforge.benchmark.verify_check import (
    FnBuilder,
    _CandidateFns,
    _check_values,
    _fmt_binding,
    _static_check,
    _typed_for,
    resolve_bindings,
)
from stepforge.benchmark.verify_data import (
    _CACHE,
    _MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_SEEDS,
    DEV32_FACTOR,
    EPS32,
    TOL_FACTOR,
    _binding_data,
    _eval_oracle,
    _one_line,
    _prepare,
    _Prepared,
    _seed_data,
    cache_stats,
    clear_caches,
    tolerance_for,
)
from stepforge.simulator import interpreter
from stepforge.simulator.shapes import DEFAULT_SIZES


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


def oracle_function(task: Task):
    """The task's oracle, compiled once: `f(ns, dtype)` -> outputs, per output a list of field tensors.

    `ns` is a namespace `global` ran in (`fns.build_namespace`) with `input_data`
    filled; the oracle runs with `dtype` as torch's default dtype. For timing
    the oracle against the simulator (scripts/bench_simulator.py).
    """
    with _VERIFY_LOCK:
        prepared = _prepare(task, _CACHE)
    return lambda ns, dtype=torch.float32: _eval_oracle(task, prepared, ns, dtype)


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
    "DEV32_FACTOR",
    "EPS32",
    "TOL_FACTOR",
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
