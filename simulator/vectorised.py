"""The vectorised engine: every operator on whole tensors.

Map evaluates its fn over all positions at once (vmap, see `fns`); Accum and
Scan are one cumsum/cummax where the fn is a running sum or maximum (see
`reductions`), otherwise they loop only over the folded positions, vectorised
across all others;
Partition and Merge use masks and index_copy over the routes; the structural
operators are views (reshape, unsqueeze, expand). Works on CPU or CUDA tensors.
A value is a list of field tensors; a stream list is a Python list of values.
"""

from __future__ import annotations

import math

import torch

from stepforge.simulator.errors import StepRuntimeError
from stepforge.simulator.interpreter import Engine, TypedOp
from stepforge.simulator.reductions import running_reduction
from stepforge.simulator.values import Stream, StreamType


def _numel(shape) -> int:
    return math.prod(shape)


def _as_shape(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`t.reshape(shape)`, skipping the call where the shape is already that (most Maps over 1-D streams)."""
    return t if t.shape == shape else t.reshape(shape)


class VectorisedEngine(Engine):
    def load(self, stream: Stream, binding):
        return stream.field_tensors()

    def unload(self, value, stype: StreamType, binding) -> Stream:
        return Stream.from_fields(stype, [t.contiguous() for t in value])

    def execute(self, op: TypedOp, arg, binding: dict):
        return getattr(self, "_" + op.call.op.lower())(op, arg, binding)

    # -- element-wise -------------------------------------------------------
    def _map(self, op, arg, binding):
        if isinstance(arg, tuple):
            arg = self._zip(op, arg, binding)
            sd = len(op.arg_type[0].shape)
        else:
            sd = len(op.arg_type.shape)
        axes = tuple(arg[0].shape[:sd])
        flat = [_as_shape(f, (_numel(axes),) + f.shape[sd:]) for f in arg]
        out = op.params["fn"].map(flat, binding)
        return [_as_shape(o, axes + o.shape[1:]) for o in out]

    def _zip(self, op, arg, binding):
        return [f for value in arg for f in value]

    def _fold(self, op, arg, binding, scan: bool):
        fn = op.params["fn"]
        k = op.params["b"]
        sd = len(op.arg_type.shape)
        axes = tuple(arg[0].shape[:sd])
        outer, inner = axes[: sd - k], axes[sd - k:]
        n_outer, n_inner = _numel(outer), _numel(inner)
        xs = [_as_shape(f, (n_outer, n_inner) + f.shape[sd:]) for f in arg]
        state = fn.init_state(binding, (n_outer,), device=arg[0].device)
        whole = running_reduction(fn.source, state, xs, keep_all=scan)
        if whole is None:
            whole = fn.fold_steps(state, xs, binding, keep_all=scan)
        if whole is not None:
            return [_as_shape(w, (axes if scan else outer) + w.shape[2 if scan else 1:]) for w in whole]
        history = []
        for t in range(n_inner):
            state = fn.fold(state, [x[:, t] for x in xs], binding)
            if scan:
                history.append(state)
        if not scan:
            return [s.reshape(outer + s.shape[1:]) for s in state]
        if not history:
            return [s.new_zeros((n_outer, 0) + s.shape[1:]).reshape(axes + s.shape[1:]) for s in state]
        return [torch.stack([h[i] for h in history], 1).reshape(axes + state[i].shape[1:]) for i in range(len(state))]

    def _accum(self, op, arg, binding):
        return self._fold(op, arg, binding, scan=False)

    def _scan(self, op, arg, binding):
        return self._fold(op, arg, binding, scan=True)

    # -- structural ---------------------------------------------------------
    def _copy(self, op, arg, binding):
        return [arg, arg]

    def _bufferize(self, op, arg, binding):
        return arg  # the layout makes buffering a change of type only

    def _streamify(self, op, arg, binding):
        return arg

    def _promote(self, op, arg, binding):
        axis = op.arg_type.rank + 1 - op.params["b"]
        return [f.unsqueeze(axis) for f in arg]

    def _expand_innermost(self, arg, sd: int, times: int):
        return [f.unsqueeze(sd).expand(f.shape[:sd] + (times,) + f.shape[sd:]) for f in arg]

    def _repeat(self, op, arg, binding):
        times = op.params["n"].evaluate(binding)
        return self._expand_innermost(arg, len(op.arg_type.shape), times)

    def _repeatref(self, op, arg, binding):
        data, ref = arg
        data_type, ref_type = op.arg_type
        times = ref[0].shape[len(ref_type.shape) - 1]
        return self._expand_innermost(data, len(data_type.shape), times)

    def _flatten(self, op, arg, binding):
        levels = op.params["L"]
        i, j = levels[0], levels[-1]
        r = op.arg_type.rank
        lo, hi = r - j, r - i + 1  # tensor axes merged: lo..hi inclusive
        return [f.reshape(f.shape[:lo] + (_numel(f.shape[lo: hi + 1]),) + f.shape[hi + 1:]) for f in arg]

    def _reshape(self, op, arg, binding):
        size = op.params["S"].evaluate(binding)
        r = op.arg_type.rank
        out = list(arg)
        for i in sorted(set(op.params["L"]), reverse=True):
            axis = r - i
            d = out[0].shape[axis]
            if d % size:
                raise StepRuntimeError(f"dim {i} has size {d}, which S={size} does not divide")
            out = [f.reshape(f.shape[:axis] + (d // size, size) + f.shape[axis + 1:]) for f in out]
            r += 1
        return out

    # -- routing ------------------------------------------------------------
    def _partition(self, op, arg, binding):
        data, idx = arg
        idx_type = op.arg_type[1]
        n_pos_axes = len(idx_type.shape)
        selected = idx[0].reshape(-1, idx[0].shape[-1]) != 0
        flat = [f.reshape((-1,) + f.shape[n_pos_axes:]) for f in data]
        outs = []
        for route, out_type in enumerate(op.out_type):
            mask = selected[:, route]
            outs.append([f[mask] for f in flat])
            binding[out_type.shape[-1].symbols[0]] = int(mask.sum())
        return outs

    def _merge(self, op, arg, binding):
        streams, idx = arg
        fn = op.params["fn"]
        idx_axes = tuple(idx[0].shape[:-1])
        selected = idx[0].reshape(-1, idx[0].shape[-1]) != 0
        n_pos = selected.shape[0]
        n_inner_axes = len(op.arg_type[0].items[0].shape) - 1
        inner = tuple(streams[0][0].shape[1: 1 + n_inner_axes])
        n_inner = _numel(inner)
        state = fn.init_state(binding, (n_pos * n_inner,), device=idx[0].device)
        state = [s.reshape((n_pos, n_inner) + s.shape[1:]) for s in state]
        for route, stream in enumerate(streams):
            pos = selected[:, route].nonzero().flatten()
            count = stream[0].shape[0]
            if pos.numel() != count:
                raise StepRuntimeError(f"route {route} carries {count} elements but idx selects it {pos.numel()} times")
            if count == 0:
                continue
            xs = [f.reshape((count * n_inner,) + f.shape[1 + n_inner_axes:]) for f in stream]
            old = [s[pos].reshape((count * n_inner,) + s.shape[2:]) for s in state]
            new = fn.fold(old, xs, binding)
            state = [s.index_copy(0, pos, n.reshape((count, n_inner) + n.shape[1:])) for s, n in zip(state, new)]
        any_route = selected.any(1)
        out = []
        for s in state:
            mask = any_route.view((n_pos,) + (1,) * (s.dim() - 1))
            s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
            out.append(s.reshape(idx_axes + inner + s.shape[2:]))
        return out
