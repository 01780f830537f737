"""The glue distance: how many glue operators a stream type is from a target (a heuristic).

Typing is always the simulator's; this only estimates the search's remaining
cost. A stream's dims (buffer dims + stream dims) are aligned, innermost
first, against the target's: a dim is kept, a run of dims is merged by one
Flatten when its product is the target dim, a missing dim is inserted by a
Promote (size 1) or a Repeat (a size of the task); the buffer boundary's
moves cost Bufferize/Streamify steps. Dims are interned as `DimTable` ids.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from stepforge.simulator.shapes import Dim
from stepforge.simulator.types import BufferType, MultihotType, TupleType
from stepforge.simulator.values import StreamType

INF = math.inf


def multihot_width(elem: MultihotType, binding: Mapping[str, int]) -> Optional[int]:
    """The Multihot width under the size binding, or None if it does not evaluate."""
    w = elem.width if isinstance(elem.width, Dim) else Dim.sym(str(elem.width))
    try:
        return w.evaluate(binding)
    except ValueError:
        return None


def chunk_span(part: tuple, whole: tuple) -> Optional[tuple[int, int]]:
    """(i, j) if `part` equals `whole[i:j]` (first match), else None."""
    n = len(part)
    for i in range(len(whole) - n + 1):
        if whole[i:i + n] == part:
            return i, i + n
    return None


def common_supersequences(a: tuple, b: tuple, limit: int = 4) -> list[tuple]:
    """Shortest common supersequences of two dim sequences (at most `limit`), e.g. for broadcasting both sides."""
    na, nb = len(a), len(b)
    lcs = [[0] * (nb + 1) for _ in range(na + 1)]
    for i in range(na - 1, -1, -1):
        for j in range(nb - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if a[i] == b[j] else max(lcs[i + 1][j], lcs[i][j + 1])
    out: list[tuple] = []

    def walk(i: int, j: int, acc: tuple):
        if len(out) >= limit:
            return
        if i == na or j == nb:
            out.append(acc + tuple(a[i:]) + tuple(b[j:]))
            return
        if a[i] == b[j]:
            walk(i + 1, j + 1, acc + (a[i],))
            return
        if lcs[i + 1][j] >= lcs[i][j + 1]:
            walk(i + 1, j, acc + (a[i],))
        if lcs[i][j + 1] >= lcs[i + 1][j]:
            walk(i, j + 1, acc + (b[j],))

    walk(0, 0, ())
    return [o for k, o in enumerate(out) if o not in out[:k]]


def decompose(st: StreamType):
    """(leaf type, full dims = buffer dims + stream dims, boundary p = number of buffer dims)."""
    elem = st.elem
    if isinstance(elem, BufferType):
        return elem.inner, tuple(elem.dims) + tuple(st.shape), len(elem.dims)
    return elem, tuple(st.shape), 0


class DimTable:
    """Dims interned to ints, with memoised products: the glue distance works on ids only."""

    def __init__(self, sizes: Sequence[Dim]):
        self._ids: dict[Dim, int] = {}
        self._dims: list[Dim] = []
        self._seq: dict[tuple, tuple[int, ...]] = {}
        self._mul: dict[tuple[int, int], int] = {}
        self.one = self.id(Dim.const(1))
        self.sizes = frozenset(self.id(d) for d in sizes)

    def id(self, d: Dim) -> int:
        i = self._ids.get(d)
        if i is None:
            i = len(self._dims)
            self._ids[d] = i
            self._dims.append(d)
        return i

    def ids(self, dims: tuple) -> tuple[int, ...]:
        r = self._seq.get(dims)
        if r is None:
            r = tuple(self.id(d) for d in dims)
            self._seq[dims] = r
        return r

    def mul(self, a: int, b: int) -> int:
        key = (a, b)
        r = self._mul.get(key)
        if r is None:
            r = self.id(self._dims[a] * self._dims[b])
            self._mul[key] = r
        return r


def _align(full: tuple, p0: int, goal: tuple, dims: DimTable):
    """DP: best[i][j] = (cost, events, pG): cover goal[:j] with full[:i] by runs and insertions.

    A run of one dim costs 0, a longer run whose product is the goal dim costs
    one Flatten; a goal dim not covered is inserted (Promote for 1, Repeat for a
    usable size, impossible otherwise). `pG` is where the source's buffer
    boundary lands in goal coordinates (x.5 when a run crosses it). Dims are
    `DimTable` ids.
    """
    nf, ng = len(full), len(goal)
    one, sizes = dims.one, dims.sizes
    best: list[list[Optional[tuple]]] = [[None] * (ng + 1) for _ in range(nf + 1)]
    best[0][0] = (0, (), 0 if p0 == 0 else None)
    for i in range(nf + 1):
        for j in range(ng + 1):
            cur = best[i][j]
            if cur is None:
                continue
            cost, events, pg = cur
            if pg is None and i == p0:
                pg = j
                best[i][j] = (cost, events, pg)
            if j < ng:
                g = goal[j]
                if g == one:
                    _relax(best, i, j + 1, (cost + 1, events + ((j, "ins1"),), pg))
                elif g in sizes:
                    _relax(best, i, j + 1, (cost + 1, events + ((j, "insX"),), pg))
                prod = one
                for i2 in range(i + 1, nf + 1):
                    prod = dims.mul(prod, full[i2 - 1])
                    if prod == g:
                        crosses = i < p0 < i2
                        npg = (j + 0.5) if (crosses and pg is None) else pg
                        if i2 - i == 1:
                            _relax(best, i2, j + 1, (cost, events, npg))
                        else:
                            _relax(best, i2, j + 1, (cost + 1, events + ((j, "flat"),), npg))
    return best


def _relax(best, i, j, value):
    cur = best[i][j]
    if cur is None or value[0] < cur[0]:
        best[i][j] = value


def _trans(a: float, b: int, tuple_mode: bool) -> float:
    if a == b:
        return 0
    if tuple_mode:
        return INF
    if b == 0:
        return 1  # Streamify
    if b > a:
        return 1  # Bufferize more dims
    return 2  # Streamify then Bufferize


def _boundary_cost(pg: float, events: tuple, p_final: int, tuple_mode: bool) -> float:
    p = pg
    cost = 0.0
    for j, kind in sorted(events):
        if kind == "insX":
            if p != j:
                cost += _trans(p, j, tuple_mode)
                p = j
        elif p > j:  # Promote and Flatten work on stream dims only
            if tuple_mode:
                return INF
            cost += 1
            p = 0
    return cost + _trans(p, p_final, tuple_mode)


def full_distance(full: tuple, p0: int, t_full: tuple, p_t: int, dims: DimTable,
                  tuple_mode: bool = False) -> float:
    """Glue from dims `full` (boundary `p0`) to exactly `t_full` (boundary `p_t`); INF if unreachable."""
    best = _align(full, p0, t_full, dims)
    cell = best[len(full)][len(t_full)]
    if cell is None:
        return INF
    cost, events, pg = cell
    if pg is None:
        pg = len(t_full)
    return cost + _boundary_cost(pg, events, p_t, tuple_mode)


def prefix_distance(full: tuple, p0: int, bdims: tuple, min_sd: int, dims: DimTable) -> float:
    """Glue to a buffer of dims `bdims` streamed over at least `min_sd` stream dims (a fn input)."""
    best = _align(full, p0, bdims, dims)
    nb = len(bdims)
    result = INF
    for i in range(len(full) + 1):
        cell = best[i][nb]
        if cell is None:
            continue
        cost, events, pg = cell
        rest = len(full) - i
        if pg is None:
            pg = nb + (p0 - i)
        extra = max(0, min_sd - rest)
        events = events + tuple((nb + rest + k, "ins1") for k in range(extra))
        result = min(result, cost + extra + _boundary_cost(pg, events, nb, False))
    return result


def target_distance(st: StreamType, target: tuple, dims: DimTable, binding: Mapping[str, int]) -> float:
    """Glue from stream type `st` to a target ("fn", "multihot", "pre" or "exact"; see TargetTables)."""
    kind = target[0]
    elem = st.elem
    if kind == "fn":
        _, fields, min_sd = target
        if not isinstance(elem, TupleType):
            return INF
        if not chunk_span(elem.items, fields):
            return INF
        return max(0, min_sd - len(st.shape))
    if kind == "multihot":
        return 0 if isinstance(elem, MultihotType) and multihot_width(elem, binding) == target[1] else INF
    if kind == "pre":
        _, leaf, bdims, min_sd = target
        if isinstance(elem, TupleType):
            return INF
        leaf_s, full, p0 = decompose(st)
        if leaf_s != leaf:
            return INF
        return prefix_distance(dims.ids(full), p0, dims.ids(bdims), min_sd, dims)
    if kind == "exact":
        _, t_elem, t_shape = target
        if isinstance(elem, TupleType) or isinstance(t_elem, TupleType):
            if elem != t_elem:
                return INF
            return full_distance(dims.ids(st.shape), 0, dims.ids(t_shape), 0, dims, tuple_mode=True)
        leaf_s, full, p0 = decompose(st)
        leaf_t, t_full, p_t = decompose(StreamType(t_elem, tuple(t_shape)))
        if leaf_s != leaf_t:
            return INF
        return full_distance(dims.ids(full), p0, dims.ids(t_full), p_t, dims)
    raise AssertionError(kind)
