"""Task functions (`fns`): built from a fn entry's `apply` source by one builder, `make_fn`.

A body is written for one element. `make_fn` turns its source into a callable
with a body compiler: by default `compile_trusted_body` (task-file code, run
as Python in a worker); model-written bodies use the fn-language interpreter
(`fnlang.OpenCompiler`), which never runs them as Python. Either way the fn
is a `StepFn`: `StepFn.map`/`StepFn.fold` evaluate it over a batch of elements
with vmap (`batching.vmap`: `torch.func.vmap` without its per-call overhead); a
body that cannot be vmapped (it branches on a value, calls `.item()`, ...)
falls back to element-by-element evaluation, and that choice is
cached per fn. `StepFn.call` evaluates one element (the naive interpreter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from stepforge.simulator.batching import fast_batching_enabled, vmap
from stepforge.simulator.errors import SimulatorError, StepRuntimeError
from stepforge.simulator.fn_bodies import BodyCompiler, FnSignature, body_returns, compile_trusted_body
from stepforge.simulator.shapes import SizeSymbol, shape_values
from stepforge.simulator.types import ElemType, LeafType, parse_dtype

INIT_VALUES = {"0": 0.0, "1": 1.0, "-1": -1.0, "-inf": -math.inf}


class Ctx(dict):
    """Size symbol -> value. Keys are symbol names, so `ctx[E]` and `ctx["E"]` agree."""

    def __setitem__(self, key, value):
        super().__setitem__(str(key), int(value))


def build_namespace(
    binding: Mapping[str, int],
    input_data: dict | None = None,
    global_code: str | None = None,
    symbols: tuple[str, ...] = ("M", "N", "K", "D", "E"),
) -> dict:
    """The globals of `global`, fns and oracles: torch, math, ctx, symbols, `X_value`s.

    `global` (task-file code) runs in it; sizes it binds through `ctx` become
    `X_value` names too. `input_data` is shared, so it can be filled later.
    """
    ctx = Ctx()
    ns: dict[str, Any] = {"torch": torch, "math": math, "ctx": ctx, "input_data": input_data if input_data is not None else {}}
    for name in set(symbols) | set(binding):
        ns[name] = SizeSymbol(name)
    for name, value in binding.items():
        ctx[name] = value
        ns[f"{name}_value"] = int(value)
    if global_code:
        exec(compile(global_code, "<global>", "exec"), ns)  # task-file code, run in a worker
        for name, value in ctx.items():
            ns.setdefault(f"{name}_value", value)
    return ns


def namespace_binding(ns: Mapping[str, Any]) -> dict[str, int]:
    """The size binding a namespace ended with (after `global` ran)."""
    return dict(ns["ctx"])


@dataclass
class StepFn:
    """A task function: typed input/output, optional fold init, compiled body.

    A body may define `for_batch(n)`, the body to use when `n` elements are
    evaluated at once (interpreted bodies divide their allocation bound by it).
    """

    name: str
    func_name: str
    input_type: ElemType
    output_type: ElemType
    body: Callable
    init: list[float] | None = None
    source: str = ""
    batch_direct: bool = False  # may call the body on whole batches where a trial shows it batches (task-file fns)
    _vmappable: bool | None = field(default=None, repr=False)
    # what a fn learns as it runs (not copied by dataclasses.replace, not compared)
    _direct: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # batch signature -> layout or None
    _out_dims: list | None = field(default=None, init=False, repr=False, compare=False)  # output element dims
    _out_symbols: tuple = field(default=(), init=False, repr=False, compare=False)  # ... and their size symbols
    _out_memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # sizes -> out_shapes

    @property
    def is_fold(self) -> bool:
        return self.init is not None

    def init_state(self, binding: Mapping[str, int], batch: tuple[int, ...] = (), device=None) -> list[torch.Tensor]:
        """The fold's initial state: one tensor per output field, batch axes first."""
        assert self.init is not None
        return [
            torch.full(batch + shape_values(f.elem_dims(), binding), v, dtype=torch.float32, device=device)
            for f, v in zip(self.output_type.fields(), self.init)
        ]

    # -- one element --------------------------------------------------------
    def call(
        self,
        inputs: list[torch.Tensor],
        state: list[torch.Tensor] | None = None,
        binding: Mapping[str, int] | None = None,
    ) -> list[torch.Tensor]:
        """Evaluate the body on one element (and fold state).

        With `binding`, each output must have its field's element shape
        exactly (as the batched path requires), not merely as many values.
        """
        watched = list(inputs) + list(state or [])
        before = _versions(watched)
        try:
            out = self.body(list(inputs), None if state is None else list(state))
        except SimulatorError:
            raise
        except Exception as exc:
            raise StepRuntimeError(f"fn {self.func_name} raised {type(exc).__name__}: {exc}") from None
        self._check_not_mutated(watched, before)
        out = self._normalise(out)
        if binding is not None:
            self._check_shapes(out, (), self.out_shapes(binding))
        return out

    def out_shapes(self, binding: Mapping[str, int]) -> list[tuple[int, ...]]:
        """The element tensor shape of each output field."""
        dims = self._out_dims
        if dims is None:
            dims = self._out_dims = [f.elem_dims() for f in self.output_type.fields()]
            self._out_symbols = tuple(sorted({name for d in dims for dim in d for name in dim.symbols}))
        try:
            key = tuple(binding[name] for name in self._out_symbols)
        except KeyError:
            return [shape_values(d, binding) for d in dims]  # raises the unbound size's error
        shapes = self._out_memo.get(key)
        if shapes is None:
            shapes = self._out_memo[key] = [shape_values(d, binding) for d in dims]
        return list(shapes)

    def _check_not_mutated(self, watched: list[torch.Tensor], before: list[int] | None) -> None:
        # An in-place update (`state[0] += x`) would alias every emitted Scan state, a Copy's
        # other stream, or the caller's input; bodies must return new tensors.
        if before is not None and _versions(watched) != before:
            raise StepRuntimeError(
                f"fn {self.func_name} modified its input or state in place; return new tensors "
                f"(write state[0] + x, not state[0] += x)")

    def _check_shapes(self, out: list[torch.Tensor], batch: tuple[int, ...], shapes: list[tuple[int, ...]]) -> None:
        fields = self.output_type.fields()
        for i, (t, f, s) in enumerate(zip(out, fields, shapes)):
            if tuple(t.shape) != batch + s:
                raise StepRuntimeError(
                    f"fn {self.func_name} returned a tensor of shape {tuple(t.shape[len(batch):])} for output "
                    f"field {i}, its output_dtype {f} needs {s}"
                )

    def _normalise(self, out) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)):
            out = [out]
        n_out = len(self.output_type.fields())
        if len(out) != n_out:
            raise StepRuntimeError(f"fn {self.func_name} returned {len(out)} fields, its output_dtype has {n_out}")
        for t in out:
            if type(t) is not torch.Tensor or t.dtype is not torch.float32:
                return [torch.as_tensor(t).to(torch.float32) for t in out]
        return list(out)

    # -- many elements ------------------------------------------------------
    def map(self, inputs: list[torch.Tensor], binding: Mapping[str, int]) -> list[torch.Tensor]:
        """Apply to a batch: every input has a leading batch axis."""
        return self._batched(inputs, None, binding)

    def fold(self, state: list[torch.Tensor], inputs: list[torch.Tensor], binding: Mapping[str, int]) -> list[torch.Tensor]:
        """One fold step for a batch of independent states."""
        return self._batched(inputs, state, binding)

    def fold_steps(
        self, state: list[torch.Tensor], inputs: list[torch.Tensor], binding: Mapping[str, int], keep_all: bool
    ) -> list[torch.Tensor] | None:
        """A whole fold: inputs are (batch, steps, ...), folded over axis 1 from `state` (batch, ...).

        Returns the final states (batch, ...), or with `keep_all` the state after every step
        (batch, steps, ...). A body that batches by itself (see `_batches_itself`) runs the
        step loop on whole batches; any other, one vmap runs the step loop for all batch rows
        at once, so the per-call cost of vmap is paid once per fold, not once per step. Every
        step's body call is the same batched call `fold` makes. Returns None where that is not possible
        (the body does not vmap, or an empty batch or fold): the caller then folds step by
        step with `fold`, which also reports a faulty body precisely.
        """
        batch, steps = inputs[0].shape[0], inputs[0].shape[1]
        if self._vmappable is False or batch == 0 or steps == 0:
            return None
        shapes = self.out_shapes(binding)
        n_in = len(inputs)
        body = self._body_for(batch)

        def step_loop(xs, st, axis: int, prefix: tuple, layout: Optional[str] = None):
            # layout None: one row under vmap; "plain"/"aligned": whole batches (see _batches_itself)
            want = [torch.Size(prefix + s) for s in shapes]
            inner = want
            if layout == "aligned":  # align once for the whole fold; outputs may keep the size-1 axes
                rank = max([x.dim() - 1 for x in xs] + [len(w) for w in want])
                xs = [x.reshape(x.shape[:2] + (1,) * (rank + 1 - x.dim()) + x.shape[2:]) for x in xs]
                inner = [torch.Size(w[:1] + (1,) * (rank - len(w)) + w[1:]) for w in want]
                st = [x.reshape(a) for x, a in zip(st, inner)]
            columns = [x.unbind(axis) for x in xs]  # every step's slice at once
            history = []
            for t in range(steps):
                step_body = body if layout is None else self.body  # under vmap: the bound per element
                st = self._normalise(step_body([c[t] for c in columns], list(st)))
                got = [o.shape for o in st]
                if got != inner:
                    if layout != "aligned" or got != want:
                        raise StepRuntimeError("wrong output shape")  # reported precisely by the step-by-step path
                    st = [o.reshape(a) for o, a in zip(st, inner)]
                if keep_all:
                    history.append(st)
            if keep_all:
                out = [torch.stack([h[i] for h in history], axis) for i in range(len(shapes))]
                return tuple(o.reshape(w[:1] + (steps,) + w[1:]) if layout == "aligned" else o for o, w in zip(out, want))
            return tuple(o.reshape(w) for o, w in zip(st, want)) if layout == "aligned" else tuple(st)

        # Bodies cannot know the step, and value-dependent ones do not vmap, so an in-place
        # update happens at step 0 too, where it bumps the real input or initial state.
        watched = list(inputs) + list(state)
        before = _versions(watched)
        try:
            layout = self._batches_itself([x[:, 0] for x in inputs], state)
            if layout is not None:
                # the body on whole batches, step by step: cheaper than any vmap
                out = step_loop(inputs, state, 1, (batch,), layout)
            else:
                out = vmap(lambda *args: step_loop(args[:n_in], args[n_in:], 0, ()), [*inputs, *state])
                self._vmappable = True
        except Exception:
            return None
        self._check_not_mutated(watched, before)
        out = list(out)
        self._check_shapes(out, (batch, steps) if keep_all else (batch,), shapes)
        return out

    def _batched(self, inputs, state, binding) -> list[torch.Tensor]:
        batch = inputs[0].shape[0]
        out_shapes = self.out_shapes(binding)
        if batch == 0:
            return [torch.zeros((0,) + s, dtype=torch.float32, device=inputs[0].device) for s in out_shapes]
        layout = self._batches_itself(inputs, state)
        if layout is not None:
            result = self._try_direct(inputs, state, layout, [(batch,) + s for s in out_shapes])
            if result is not None:
                return result  # _call_whole gave exactly these shapes
        result = None
        if self._vmappable is not False:
            result = self._try_vmap(inputs, state)
        if result is None:
            result = self._loop(inputs, state)
        # vmap batches every output (also one that ignores its input), and the loop stacks
        # rows, so an output without the leading batch axis is a wrong shape, never "broadcast".
        self._check_shapes(result, (batch,), out_shapes)
        return result

    def _body_for(self, batch: int) -> Callable:
        scaled = getattr(self.body, "for_batch", None)
        return scaled(batch) if scaled is not None else self.body

    def _try_vmap(self, inputs, state) -> list[torch.Tensor] | None:
        n_in = len(inputs)
        body = self._body_for(inputs[0].shape[0])

        def element(*args):
            ins = list(args[:n_in])
            st = list(args[n_in:]) if state is not None else None
            return tuple(self._normalise(body(ins, st)))

        watched = list(inputs) + list(state or [])
        before = _versions(watched)
        try:
            out = vmap(element, [*inputs, *(state or [])])
        except Exception:
            if self._vmappable is None:
                self._vmappable = False
            # evaluate element by element: the same result, or the body's own error as a StepRuntimeError
            return None
        self._check_not_mutated(watched, before)
        self._vmappable = True
        return list(out)

    # -- bodies that batch by themselves ---------------------------------------
    # Most task-file bodies are elementwise or address only trailing axes (`x[..., 0]`,
    # `x @ W`, `.sum(-1)`), so called on a whole batch they compute what vmap computes, for a
    # fraction of its cost. Two layouts are tried: "plain" (each tensor batched on dim 0) and
    # "aligned" (lower-rank elements get size-1 axes after the batch axis, so that a scalar
    # field times a Buffer field broadcasts as it does for one element; size-1 axes are taken
    # off the outputs again). Whether a body batches, and in which layout, is decided per batch
    # signature (shapes and dtypes of the inputs and state) by a trial on random inputs of that
    # signature (at most _TRIAL_ROWS rows): vmap and the plain call must agree (same shapes,
    # values within float32 rounding). A body that reduces or indexes over the batch axis (`x.mean()`, `x[:h]`)
    # disagrees on random data and keeps vmap. Only fns with `batch_direct` (bodies from task
    # files, see `make_fn`) are tried.

    def _batches_itself(self, inputs, state) -> Optional[str]:
        """The layout in which the body batches by itself for this signature, or None."""
        if not self.batch_direct or self._vmappable is False or not fast_batching_enabled():
            return None
        args = [*inputs, *(state or [])]
        signature = (state is not None,) + tuple((a.shape, a.dtype) for a in args)
        if signature not in self._direct:
            self._direct[signature] = _trial_layout(self, len(inputs), state is not None, args)
        return self._direct[signature]

    def _call_whole(self, inputs, state, layout: str, shapes) -> list[torch.Tensor] | None:
        """The body called once on the batch in `layout`; None if it modified an input in place
        or its outputs do not have `shapes`."""
        watched = list(inputs) + list(state or [])
        before = _versions(watched)
        if layout == "aligned":
            rank = max(a.dim() for a in watched)
            inputs, state = _aligned(inputs, rank), (None if state is None else _aligned(state, rank))
        out = self._normalise(self.body(list(inputs), None if state is None else list(state)))
        if before is not None and _versions(watched) != before:
            return None
        if len(out) != len(shapes):
            return None
        for i, (o, shape) in enumerate(zip(out, shapes)):
            if o.shape != shape:
                if layout == "aligned" and o.dim() > len(shape) and o.shape[0] == shape[0] and \
                        o.shape[len(o.shape) - len(shape) + 1:] == shape[1:] and \
                        all(d == 1 for d in o.shape[1: len(o.shape) - len(shape) + 1]):
                    out[i] = o.reshape(shape)
                else:
                    return None
        return out

    def _try_direct(self, inputs, state, layout: str, shapes) -> list[torch.Tensor] | None:
        try:
            return self._call_whole(inputs, state, layout, shapes)
        except Exception:
            return None  # vmap or the element loop reports the body's error precisely

    def _loop(self, inputs, state) -> list[torch.Tensor]:
        rows = [
            self.call([x[b] for x in inputs], None if state is None else [s[b] for s in state])
            for b in range(inputs[0].shape[0])
        ]
        return [torch.stack([r[i] for r in rows]) for i in range(len(rows[0]))]


_TRIAL_ROWS = 64  # batch rows of a trial (a body that mixes rows disagrees with vmap on any 2 or more)


def _trial_layout(fn: "StepFn", n_in: int, has_state: bool, like: list[torch.Tensor]) -> Optional[str]:
    """The layout in which `fn`'s body batches by itself on random inputs like `like`, or None."""
    if not like or any(a.dim() == 0 or a.shape[0] < 1 for a in like) or not all(a.is_floating_point() for a in like):
        return None
    gen = torch.Generator(device=like[0].device).manual_seed(12345)
    rows = min(like[0].shape[0], _TRIAL_ROWS)  # the trial's cost is bounded, whatever the batch
    trial = [torch.randn((rows,) + a.shape[1:], generator=gen, dtype=a.dtype, device=a.device) for a in like]

    def element(*args):
        return tuple(fn._normalise(fn.body(list(args[:n_in]), list(args[n_in:]) if has_state else None)))

    try:
        want = vmap(element, [t.clone() for t in trial])
    except Exception:
        return None  # the body does not vmap: the usual path finds out and falls back to elements
    fn._vmappable = True
    shapes = [w.shape for w in want]
    layouts = ("plain", "aligned") if len({a.dim() for a in like}) > 1 else ("plain",)
    for layout in layouts:
        try:
            got = fn._call_whole(trial[:n_in], trial[n_in:] if has_state else None, layout, shapes)
        except Exception:
            continue
        if got is not None and all(torch.allclose(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
                                   for g, w in zip(got, want)) and _rows_independent(fn, trial, n_in, has_state,
                                                                                      layout, shapes, got):
            return layout
    return None

def _rows_independent(fn: "StepFn", trial, n_in: int, has_state: bool, layout: str, shapes, got) -> bool:
    """Row 0 of the outputs stays the same when every other row moves far both ways.

    Agreement with vmap on one random batch is not enough: `maximum(state, x + y.sum())`
    reduces over the batch yet agrees whenever `state` dominates. A body that mixes rows
    changes row 0 once the other rows move far.
    """
    if trial[0].shape[0] < 2:
        return True  # one row: nothing to mix
    for shift in (1e3, -1e3):
        moved = [t.clone() for t in trial]
        for t in moved:
            t[1:] += shift
        try:
            again = fn._call_whole(moved[:n_in], moved[n_in:] if has_state else None, layout, shapes)
        except Exception:
            return False
        if again is None or not all(torch.allclose(a[0], g[0], rtol=1e-5, atol=1e-6, equal_nan=True)
                                    for a, g in zip(again, got)):
            return False
    return True


def _aligned(tensors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Each (batch, *elem) tensor as (batch, 1, ..., 1, *elem) of `rank` dims."""
    return [t if t.dim() == rank else t.reshape(t.shape[:1] + (1,) * (rank - t.dim()) + t.shape[1:]) for t in tensors]


def _versions(tensors: list[torch.Tensor]) -> list[int] | None:
    """Version counters (bumped by in-place ops); None for inference tensors, which keep none."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return None


def make_fn(
    name: str,
    func_name: str,
    input_dtype,
    output_dtype,
    apply: str,
    init=None,
    namespace: dict | None = None,
    compile_body: BodyCompiler = compile_trusted_body,
    batch_direct: bool = True,
) -> StepFn:
    """Build a StepFn from a fn entry; `compile_body(apply, signature, namespace)` makes its body.

    The body sees `namespace` (see `build_namespace`): as globals for a trusted
    body, as its size values and parameters for an interpreted one.
    """
    input_type, output_type = parse_dtype(input_dtype), parse_dtype(output_dtype)
    inits = None if init is None else parse_init(init, len(output_type.fields()), func_name)
    scope = namespace if namespace is not None else build_namespace({})
    body = compile_body(apply, FnSignature(func_name, input_type, output_type, inits is not None), scope)
    return StepFn(name=name, func_name=func_name, input_type=input_type, output_type=output_type, body=body,
                  init=inits, source=apply, batch_direct=batch_direct)


def parse_init(init, n_fields: int, func_name: str = "fn") -> list[float]:
    """Fold inits: one of 0, 1, -1, -inf per output field (a bare value for one field)."""
    values = init if isinstance(init, (list, tuple)) else [init]
    if len(values) != n_fields:
        raise ValueError(f"fn {func_name}: init has {len(values)} values, output_dtype has {n_fields} fields")
    out = []
    for v in values:
        key = str(v).strip().replace("float('-inf')", "-inf").replace("float(\"-inf\")", "-inf")
        try:
            value = INIT_VALUES[key] if key in INIT_VALUES else float(key)
        except ValueError:
            value = None
        if isinstance(v, bool) or value not in INIT_VALUES.values():
            raise ValueError(f"fn {func_name}: init value {str(v)[:40]!r} is not one of 0, 1, -1, -inf")
        out.append(value)
    return out


def leaf_shapes(elem: ElemType, binding: Mapping[str, int]) -> list[tuple[int, ...]]:
    """Concrete element tensor shape of each field."""
    return [shape_values(f.elem_dims(), binding) for f in elem.fields()]


__all__ = ["BodyCompiler", "Ctx", "FnSignature", "LeafType", "StepFn", "body_returns", "build_namespace",
           "compile_trusted_body", "leaf_shapes", "make_fn", "namespace_binding", "parse_init"]
