"""The fn vocabulary of open mode (docs/language.md, section 5a): each name, the torch function it means.

`KNOWN` is an explicit table from a name to an `Entry`: the torch function a
call `torch.F(...)` / `torch.nn.functional.F(...)` runs, the Tensor method a
call `x.F(...)` runs (None where torch has no such method), and a size rule
that says, from the arguments alone, how many elements the result will have.
The interpreter checks that number against the element cap before it calls
the function, so no call can allocate past the cap. `STANDARD` names the
standard vocabulary; a task narrows or extends it (`vocabulary(add, remove)`),
but only with names of `KNOWN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
# A size rule: the elements of the result (None: no more than its largest tensor argument); it raises
# ValueError where the arguments leave the size unknown (a tensor where a size belongs).
SizeRule = Callable[[tuple, dict], Optional[int]]


def _tensor_shapes(values: Iterable[Any]) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in values if isinstance(v, Tensor)]


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


def pointwise(args: tuple, kwargs: dict) -> Optional[int]:
    """Elements of the broadcast of every tensor argument (None if they do not broadcast: the op says why)."""
    shapes = _tensor_shapes(list(args) + list(kwargs.values()))
    if len(shapes) < 2:
        return None
    out = _broadcast(shapes)
    return None if out is None else _numel(out)


def _broadcast(shapes: list[tuple[int, ...]]) -> Optional[list[int]]:
    """torch's broadcasting rule in plain Python (torch.broadcast_shapes costs more than most ops it sizes)."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, d in enumerate(shape, rank - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    return None
                out[i] = d
    return out


def _no_growth(args: tuple, kwargs: dict) -> None:
    return None


def _matmul(args: tuple, kwargs: dict) -> Optional[int]:
    a, b = (args + (None, None))[:2]
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.dim() == 0 or b.dim() == 0:
        return None  # torch.matmul refuses 0-d operands itself
    sa, sb = tuple(a.shape), tuple(b.shape)
    left = (1,) + sa if len(sa) == 1 else sa  # torch.matmul's rule: a vector is a matrix, then the axis is dropped
    right = sb + (1,) if len(sb) == 1 else sb
    batch = _broadcast([left[:-2], right[:-2]])
    if left[-1] != right[-2] or batch is None:
        return None  # the op raises, naming the shapes
    return _numel(batch + ([left[-2]] if len(sa) > 1 else []) + ([right[-1]] if len(sb) > 1 else []))


def _outer(args: tuple, kwargs: dict) -> Optional[int]:
    a, b = (args + (None, None))[:2]
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.numel() * b.numel()
    return None


def _joined(args: tuple, kwargs: dict) -> Optional[int]:
    items = args[0] if args else kwargs.get("tensors")
    if isinstance(items, (list, tuple)):
        return sum(t.numel() for t in items if isinstance(t, Tensor))
    return None


def _sizes(values: tuple) -> list[int]:
    """A shape given as ints or as one list/tuple of ints."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = tuple(values[0])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return list(values)
    raise ValueError("sizes must be integers")


def _shape_arg(args: tuple, kwargs: dict) -> int:
    """zeros/ones(*shape): the product of the shape."""
    return _numel(abs(v) for v in _sizes(tuple(args) if args else (kwargs.get("shape", ()),)))


def _full(args: tuple, kwargs: dict) -> int:
    return _numel(abs(v) for v in _sizes((args[0] if args else kwargs.get("shape", ()),)))


def _self_shape(args: tuple, kwargs: dict) -> Optional[int]:
    """reshape/expand(x, *shape): the product of the shape, a -1 counted as all the elements of x."""
    if not args or not isinstance(args[0], Tensor):
        return None
    sizes = _sizes(tuple(args[1:]) if len(args) > 1 else (kwargs.get("shape", ()),))
    return _numel(args[0].numel() if v < 0 else v for v in sizes)


def _tiled(args: tuple, kwargs: dict) -> Optional[int]:
    """repeat/tile(x, *times): the elements of x times the product of the repeats."""
    if not args or not isinstance(args[0], Tensor):
        return None
    times = _sizes(tuple(args[1:]) if len(args) > 1 else (kwargs.get("dims", ()),))
    return args[0].numel() * _numel(abs(v) for v in times)


def _arange(args: tuple, kwargs: dict) -> int:
    nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(nums) != len(args) or not 1 <= len(nums) <= 3:
        raise ValueError("arange takes one to three numbers (start, end, step)")
    start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) == 3 else 1)
    if step == 0 or not all(math.isfinite(v) for v in (start, end, step)):
        raise ValueError("arange needs finite numbers and a step other than 0")
    return max(0, math.ceil((end - start) / step))


def _one_hot(args: tuple, kwargs: dict) -> Optional[int]:
    x = args[0] if args else None
    classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
    if not isinstance(x, Tensor):
        return None
    if not isinstance(classes, int) or classes < 1:
        raise ValueError("one_hot needs num_classes (a positive integer): its size must be known before it runs")
    return x.numel() * classes


@dataclass(frozen=True)
class Entry:
    """One vocabulary name: its torch function, its Tensor method (or None), its size rule."""

    name: str
    function: Optional[Callable]
    method: Optional[Callable]
    size: SizeRule


def _table() -> dict[str, Entry]:
    P, S, G = pointwise, _no_growth, None
    rows: list[tuple[str, Optional[Callable], Optional[Callable], Optional[SizeRule]]] = [
        # elementwise
        ("add", torch.add, Tensor.add, P), ("sub", torch.sub, Tensor.sub, P), ("mul", torch.mul, Tensor.mul, P),
        ("div", torch.div, Tensor.div, P), ("neg", torch.neg, Tensor.neg, P), ("abs", torch.abs, Tensor.abs, P),
        ("exp", torch.exp, Tensor.exp, P), ("log", torch.log, Tensor.log, P), ("sqrt", torch.sqrt, Tensor.sqrt, P),
        ("rsqrt", torch.rsqrt, Tensor.rsqrt, P), ("tanh", torch.tanh, Tensor.tanh, P),
        ("sigmoid", torch.sigmoid, Tensor.sigmoid, P), ("relu", torch.relu, Tensor.relu, P),
        ("gelu", F.gelu, G, P), ("silu", F.silu, G, P), ("erf", torch.erf, Tensor.erf, P),
        ("sin", torch.sin, Tensor.sin, P), ("cos", torch.cos, Tensor.cos, P), ("pow", torch.pow, Tensor.pow, P),
        ("maximum", torch.maximum, Tensor.maximum, P), ("minimum", torch.minimum, Tensor.minimum, P),
        ("clamp", torch.clamp, Tensor.clamp, P), ("where", torch.where, Tensor.where, P),
        # reductions
        ("sum", torch.sum, Tensor.sum, S), ("mean", torch.mean, Tensor.mean, S), ("max", torch.max, Tensor.max, P),
        ("min", torch.min, Tensor.min, P), ("amax", torch.amax, Tensor.amax, S), ("amin", torch.amin, Tensor.amin, S),
        ("logsumexp", torch.logsumexp, Tensor.logsumexp, S), ("softmax", torch.softmax, Tensor.softmax, S),
        ("cumsum", torch.cumsum, Tensor.cumsum, S),
        # linear
        ("matmul", torch.matmul, Tensor.matmul, _matmul), ("outer", torch.outer, Tensor.outer, _outer),
        ("transpose", torch.transpose, Tensor.transpose, S),
        # layout
        ("reshape", torch.reshape, Tensor.reshape, _self_shape), ("flatten", torch.flatten, Tensor.flatten, S),
        ("unsqueeze", torch.unsqueeze, Tensor.unsqueeze, S), ("squeeze", torch.squeeze, Tensor.squeeze, S),
        ("flip", torch.flip, Tensor.flip, S), ("cat", torch.cat, G, _joined), ("stack", torch.stack, G, _joined),
        # selection
        ("topk", torch.topk, Tensor.topk, S), ("argmax", torch.argmax, Tensor.argmax, S),
        ("gather", torch.gather, Tensor.gather, S), ("scatter", torch.scatter, Tensor.scatter, S),
        ("one_hot", F.one_hot, G, _one_hot), ("zeros_like", torch.zeros_like, G, S),
        ("ones_like", torch.ones_like, G, S), ("full_like", torch.full_like, G, S), ("arange", torch.arange, G, _arange),
        # beyond the standard vocabulary: a task may add these with `vocabulary: {add: [...]}`
        ("zeros", torch.zeros, G, _shape_arg), ("ones", torch.ones, G, _shape_arg), ("full", torch.full, G, _full),
        ("repeat", G, Tensor.repeat, _tiled), ("tile", torch.tile, Tensor.tile, _tiled),
        ("expand", G, Tensor.expand, _self_shape), ("floor", torch.floor, Tensor.floor, P),
        ("ceil", torch.ceil, Tensor.ceil, P), ("round", torch.round, Tensor.round, P),
        ("sign", torch.sign, Tensor.sign, P), ("log1p", torch.log1p, Tensor.log1p, P),
        ("expm1", torch.expm1, Tensor.expm1, P), ("tan", torch.tan, Tensor.tan, P),
        ("reciprocal", torch.reciprocal, Tensor.reciprocal, P), ("square", torch.square, Tensor.square, P),
        ("prod", torch.prod, Tensor.prod, S), ("var", torch.var, Tensor.var, S), ("std", torch.std, Tensor.std, S),
        ("argmin", torch.argmin, Tensor.argmin, S), ("sort", torch.sort, Tensor.sort, S),
        ("argsort", torch.argsort, Tensor.argsort, S), ("roll", torch.roll, Tensor.roll, S),
        ("tril", torch.tril, Tensor.tril, S), ("triu", torch.triu, Tensor.triu, S),
    ]
    return {name: Entry(name, fn, method, rule) for name, fn, method, rule in rows}


KNOWN: Mapping[str, Entry] = _table()

STANDARD: tuple[str, ...] = tuple(
    "add sub mul div neg abs exp log sqrt rsqrt tanh sigmoid relu gelu silu erf sin cos pow maximum minimum clamp "
    "where sum mean max min amax amin logsumexp softmax cumsum matmul outer transpose T reshape flatten unsqueeze "
    "squeeze flip cat stack topk argmax gather scatter one_hot zeros_like ones_like full_like arange".split())

ATTRIBUTES = ("T",)  # vocabulary names that are attributes, not calls

KEYWORDS = frozenset("dim keepdim k largest index src value min max dims shape num_classes".split())


def known_names() -> list[str]:
    """Every name a task's `vocabulary` may add or remove."""
    return sorted(set(KNOWN) | set(ATTRIBUTES))


def vocabulary(add: Iterable[str] = (), remove: Iterable[str] = ()) -> frozenset[str]:
    """The standard vocabulary with `add` added and `remove` removed; ValueError naming an unknown name."""
    add, remove = list(add), list(remove)
    unknown = sorted({n for n in add + remove if n not in KNOWN and n not in ATTRIBUTES})
    if unknown:
        raise ValueError(f"unknown vocabulary name(s) {', '.join(unknown)}; known: {', '.join(known_names())}")
    return frozenset((set(STANDARD) | set(add)) - set(remove))


__all__ = ["ATTRIBUTES", "Entry", "KEYWORDS", "KNOWN", "STANDARD", "known_names", "pointwise", "vocabulary"]
