"""The fn language's evaluation: what each accepted construct does to values while a body runs.

`fnlang_parse` turns an accepted body into closures that call these functions.
Each checks the kinds of its values (tensors, numbers, lists of them; never a
list where an operator needs a number), bounds the size of what it is about to
make before making it (`Site.bound`), keeps Python integers small, and reports
a failure as a one-line error naming the fn and the line (`Site`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from stepforge.simulator.errors import ResourceError, SimulatorError, StepRuntimeError
from stepforge.simulator.fnlang_vocab import SizeRule

MAX_INT = 2**62


class Env:
    """One evaluation: the body's variables, the task's parameters, the element bound and what is used of it.

    `limit` bounds the elements of all tensors one evaluation makes together
    (so also what it can hold at once); `used` counts them.
    """

    __slots__ = ("vars", "params", "limit", "used")

    def __init__(self, variables: dict, params: Mapping[str, Any], limit: int):
        self.vars, self.params, self.limit, self.used = variables, params, limit, 0


Closure = Callable[[Env], Any]


class InterpretedBody:
    """A compiled fn body: call it as `body(inputs, state)`, like a task fn's body."""

    def __init__(self, run: Closure, params: Mapping[str, Any], cap: int, scale: int = 1):
        self._run, self._params, self._cap, self._scale = run, params, cap, scale

    def __call__(self, inputs: list, state: Optional[list] = None):
        return self._run(Env({"input": inputs, "state": state}, self._params, self._cap // self._scale))

    def for_batch(self, n: int) -> "InterpretedBody":
        """The same body for `n` elements evaluated at once (vmap): its allocation bound divided by `n`."""
        return InterpretedBody(self._run, self._params, self._cap, max(1, int(n)))


class Site:
    """Where a construct is (fn and line): the errors it raises name it."""

    __slots__ = ("fn", "line")

    def __init__(self, fn: str, line: int):
        self.fn, self.line = fn, line

    def error(self, what: str) -> StepRuntimeError:
        return StepRuntimeError(f"fn {self.fn}, line {self.line}: {what}")

    def bound(self, env: Env, what: str, size: Optional[int], values: tuple = ()) -> None:
        """Count a result of `size` elements (None: as many as its largest tensor argument) before it is made.

        Refuses it if it alone, or with everything the evaluation made before, passes the bound.
        """
        if size is None:
            size = max((v.numel() for v in values if isinstance(v, torch.Tensor)), default=1)
        if size > env.limit:
            raise ResourceError(f"fn {self.fn}, line {self.line}: {what} would make a tensor of {size:,} elements "
                                f"(limit {env.limit:,} per element of the stream)")
        env.used += size
        if env.used > env.limit:
            raise ResourceError(f"fn {self.fn}, line {self.line}: the body would make {env.used:,} elements in all "
                                f"(limit {env.limit:,} per element of the stream)")

    def small_int(self, value: Any) -> Any:
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ResourceError(f"fn {self.fn}, line {self.line}: an integer of {value.bit_length()} bits is too large")
        return value


def kind(v: Any) -> str:
    return "tensor" if isinstance(v, torch.Tensor) else type(v).__name__


def _operand(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, int, float))


def _argument(v: Any, depth: int = 0) -> bool:
    if v is None or isinstance(v, (torch.Tensor, int, float)):
        return True
    return depth < 2 and isinstance(v, (list, tuple)) and all(_argument(x, depth + 1) for x in v)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def binop(site: Site, env: Env, symbol: str, op: Callable, size_of: SizeRule, a: Any, b: Any) -> Any:
    """`a <symbol> b` for tensors and numbers: the result's size bounded first, integers kept small."""
    for v in (a, b):
        if not _operand(v):
            raise site.error(f"'{symbol}' needs tensors or numbers, got a {kind(v)}")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        site.bound(env, f"'{symbol}'", size_of((a, b), {}), (a, b))
    elif symbol == "**" and isinstance(a, int) and isinstance(b, int):
        if b > 0 and abs(a) > 1 and b * abs(a).bit_length() > 62:
            raise ResourceError(f"fn {site.fn}, line {site.line}: {a} ** {b} is too large an integer")
    try:
        out = op(a, b)
    except Exception as exc:
        raise site.error(f"'{symbol}' raised {type(exc).__name__}: {_first_line(exc)}") from None
    return site.small_int(out)


def negate(site: Site, v: Any) -> Any:
    if not _operand(v):
        raise site.error(f"'-' needs a tensor or a number, got a {kind(v)}")
    return -v


def transpose(site: Site, v: Any) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise site.error(f".T needs a tensor, got a {kind(v)}")
    return v.T


def parameter(site: Site, env: Env, name: str) -> Any:
    if name not in env.params:
        raise site.error(f"parameter {name!r} has no data")
    return env.params[name]


def subscript(site: Site, v: Any, index: Any) -> Any:
    """A tensor indexed by integers, slices, ... and None; a list or tuple by one integer."""
    if isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and isinstance(index, int)):
        try:
            return v[index]
        except (IndexError, RuntimeError, TypeError) as exc:
            raise site.error(f"indexing failed: {_first_line(exc)}") from None
    raise site.error(f"cannot index a {kind(v)} with {index!r}")


def index_int(site: Site, v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise site.error(f"an index must be an integer, '{name}' is a {kind(v)}")
    return v


def unpack(site: Site, v: Any, n: int) -> Any:
    if not isinstance(v, (list, tuple)):
        raise site.error(f"can only unpack a list or tuple into {n} names, got a {kind(v)}")
    if len(v) != n:
        raise site.error(f"cannot unpack {len(v)} values into {n} names")
    return v


def call(site: Site, env: Env, label: str, size_of: SizeRule, function: Callable, values: list, named: dict,
         method: bool) -> Any:
    """A vocabulary call: argument kinds checked, the result's size bounded, then the torch function run."""
    if method and not isinstance(values[0], torch.Tensor):
        raise site.error(f"{label}(...) needs a tensor before the dot, got a {kind(values[0])}")
    for v in list(values) + list(named.values()):
        if not _argument(v):
            raise site.error(f"{label} got an argument of kind {kind(v)}")
    try:
        size = size_of(tuple(values), named)
    except ValueError as exc:
        raise site.error(f"{label}: {exc}") from None
    site.bound(env, label, size, tuple(values) + tuple(named.values()))
    try:
        return function(*values, **named)
    except SimulatorError:
        raise
    except Exception as exc:
        raise site.error(f"{label} raised {type(exc).__name__}: {_first_line(exc)}") from None


def compare(site: Site, env: Env, symbol: str, op: Callable, size_of: SizeRule, a: Any, b: Any) -> Any:
    for v in (a, b):
        if not _operand(v):
            raise site.error(f"'{symbol}' needs tensors or numbers, got a {kind(v)}")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        site.bound(env, f"'{symbol}'", size_of((a, b), {}), (a, b))
    return op(a, b)


__all__ = ["Closure", "Env", "InterpretedBody", "Site", "binop", "call", "compare", "index_int", "kind", "negate",
           "parameter", "subscript", "transpose", "unpack"]
