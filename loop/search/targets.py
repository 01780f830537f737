"""The targets, glue distances and heuristic of one task (part of its `TaskTables`).

A target is what a live stream may be glued toward: a fn's input (`fn` for a
multi-field input, `pre` for a buffer/leaf input with a least number of
stream dims), the Multihot index of an expert group (`multihot`), or an
exact element type and shape (`exact`: an output, or a zip partner's shape).
Targets are interned as ints; the distance of a type to a target is
`distance.target_distance`. The heuristic of a state adds up each live
stream's glue to its nearest target, one application per unused fn, one Zip
per fn whose input no live stream has yet, and the live streams in excess of
the outputs (the package docstring, loop/search/__init__.py, describes it).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Sequence

from stepforge.loop.search.distance import INF, chunk_span, common_supersequences, target_distance
from stepforge.loop.search.task import fields_of
from stepforge.simulator.types import BufferType, TupleType

if TYPE_CHECKING:
    from stepforge.loop.search.searcher import State
    from stepforge.loop.search.tables import TaskTables


class TargetTables:
    """Targets and distances of one task's types, cached; shared with the task's `TaskTables`."""

    def __init__(self, tables: "TaskTables"):
        self.tables = tables
        self._targets: list[tuple] = []
        self._target_ids: dict[tuple, int] = {}
        self._dist_cache: dict[tuple[int, int], float] = {}
        self._targets_cache: dict[tuple, tuple] = {}
        self._partner_type: dict[int, bool] = {}
        self._pair_glue_cache: dict[tuple, float] = {}
        self._pair_cost_cache: dict[tuple, float] = {}
        self._common_cache: dict[tuple, list] = {}
        self._h_cache: dict[tuple, float] = {}
        self._lt_cache: dict[tuple, list] = {}
        self._eff_cache: dict[tuple, float] = {}
        self._relevant_cache: dict[tuple, bool] = {}
        self._fields_ids: dict[tuple, int] = {}
        self._type_fields_id: dict[int, int] = {}
        self._fn_fields_id = {n: self._fields_ids.setdefault(f, len(self._fields_ids))
                              for n, f in tables.fn_fields.items()}

    def target(self, t: tuple) -> int:
        """The id of a target tuple (equal targets, equal ids)."""
        tid = self._target_ids.get(t)
        if tid is None:
            tid = len(self._targets)
            self._targets.append(t)
            self._target_ids[t] = tid
        return tid

    def _pre_target(self, leaf, min_sd: int) -> int:
        if isinstance(leaf, BufferType):
            return self.target(("pre", leaf.inner, leaf.dims, min_sd))
        return self.target(("pre", leaf, (), min_sd))

    def _fields_id(self, type_id: int) -> int:
        """An int naming the type's field tuple (equal field tuples, equal ids)."""
        r = self._type_fields_id.get(type_id)
        if r is None:
            r = self._fields_ids.setdefault(fields_of(self.tables.types[type_id].elem), len(self._fields_ids))
            self._type_fields_id[type_id] = r
        return r

    def _is_partner_type(self, type_id: int) -> bool:
        """Whether streams of this type fill part of some multi-field fn input (a zip partner)."""
        cached = self._partner_type.get(type_id)
        if cached is None:
            elem_fields = fields_of(self.tables.types[type_id].elem)
            cached = any(len(f) > 1 and chunk_span(elem_fields, f) for f in self.tables.fn_fields.values())
            self._partner_type[type_id] = cached
        return cached

    def _stream_targets(self, type_id: int, partners: tuple[int, ...], used: tuple[int, ...]) -> tuple:
        """((target id, extra cost), ...) for one live stream, given the other live streams' partner types.

        Targets: each fn's input (its fields; for a multi-field input, the
        exact shape of a live zip partner when there is one), at extra cost 1
        for a fn already applied (applying it again is one more operator) and
        left out once a fn is at `max_fn_uses`; the Multihot index of an
        unused expert group; and every output's exact type and shape.
        `partners` are the sorted distinct zip-partner types of the other
        live streams.
        """
        key = (type_id, partners, used)
        cached = self._targets_cache.get(key)
        if cached is not None:
            return cached
        tables = self.tables
        targets: dict[int, int] = {}

        def add(target_id: int, extra: int):
            if targets.get(target_id, INF) > extra:
                targets[target_id] = extra

        for name in tables.fn_names:
            count = used[tables.fn_index[name]]
            if count >= tables.config.max_fn_uses:
                continue
            if name in tables.expert_fns and count:
                continue
            extra = 1 if count else 0
            fields = tables.fn_fields[name]
            min_sd = 2 if tables.task.fns[name].is_fold else 1
            if len(fields) == 1:
                add(self._pre_target(fields[0], min_sd), extra)
                continue
            add(self.target(("fn", fields, min_sd)), extra)
            for i, field_type in enumerate(fields):
                shapes = []
                for p in partners:
                    st = tables.types[p]
                    span = chunk_span(fields_of(st.elem), fields)
                    if span and not (span[0] <= i < span[1]):
                        # the partner's shape, or (both sides broadcast) a common supersequence
                        shapes.extend(self._common_shapes(p, type_id)[:1] + self._common_shapes(type_id, p)[2:])
                if shapes:
                    for shape in shapes:
                        add(self.target(("exact", field_type, shape)), extra)
                else:
                    add(self._pre_target(field_type, min_sd), extra)
        for g in tables.expert_groups:
            if not used[tables.fn_index[g[0]]]:
                add(self.target(("multihot", len(g))), 0)
        for tid in tables.output_types:
            st = tables.types[tid]
            add(self.target(("exact", st.elem, st.shape)), 0)
        result = tuple(sorted(targets.items()))
        self._targets_cache[key] = result
        return result

    def live_targets(self, state: "State") -> list[tuple]:
        """The targets of each live stream of `state`, in `state.live` order."""
        cached = self._lt_cache.get((state.live, state.used))
        if cached is not None:
            return cached
        types = [self.tables.term_type[t] for t in state.live]
        partner_types = Counter(t for t in types if self._is_partner_type(t))
        everyone = tuple(sorted(partner_types))
        result = []
        for tid in types:
            if partner_types.get(tid) == 1:
                others = tuple(t for t in everyone if t != tid)
            else:
                others = everyone
            result.append(self._stream_targets(tid, others, state.used))
        self._lt_cache[(state.live, state.used)] = result
        return result

    def dist(self, type_id: int, target_id: int) -> float:
        """Glue from a stream type to a target (`distance.target_distance`), cached."""
        key = (type_id, target_id)
        d = self._dist_cache.get(key)
        if d is None:
            tables = self.tables
            d = target_distance(tables.types[type_id], self._targets[target_id], tables.dims, tables.task.binding)
            self._dist_cache[key] = d
        return d

    def _eff_dist(self, type_id: int, targets: tuple) -> float:
        """Glue plus extra cost to the nearest of `targets` ((target id, extra), ...)."""
        key = (type_id, targets)
        d = self._eff_cache.get(key)
        if d is None:
            d = min((self.dist(type_id, t) + extra for t, extra in targets), default=INF)
            self._eff_cache[key] = d
        return d

    def relevant(self, before: int, after: int, targets: tuple) -> bool:
        """Whether glue from type `before` to `after` brings the stream strictly closer to some target."""
        key = (before, after, targets)
        r = self._relevant_cache.get(key)
        if r is None:
            r = any(self.dist(after, t) < self.dist(before, t) for t, _ in targets)
            self._relevant_cache[key] = r
        return r

    def heuristic(self, state: State) -> float:
        """The estimated remaining cost of `state` (INF: a live stream reaches no target), cached by live streams."""
        h = self._h_cache.get(state.live)
        if h is None:
            h = self._compute_heuristic(state)
            self._h_cache[state.live] = h
        return h

    def _compute_heuristic(self, state: State) -> float:
        tables = self.tables
        glue = 0.0
        for term, targets in zip(state.live, self.live_targets(state)):
            d = self._eff_dist(tables.term_type[term], targets)
            if d == INF:
                return INF
            glue += d
        live_types = [tables.term_type[term] for term in state.live]
        live_fields = {self._fields_id(tid) for tid in live_types}
        zips = 0
        h = 0.0
        pair_glue = 0.0
        for name in tables.fn_names:
            if state.used[tables.fn_index[name]]:
                continue
            if name in tables.expert_fns:
                continue
            h += 1
            fields = tables.fn_fields[name]
            if len(fields) > 1 and self._fn_fields_id[name] not in live_fields:
                h += 1
                zips += 1
                pair_glue += self._pair_glue(name, live_types)
        h += max(glue, pair_glue)
        for g in tables.expert_groups:
            if not state.used[tables.fn_index[g[0]]]:
                h += 1  # one route move (Partition, per-route Map, Merge)
        excess = len(state.live) - len(tables.output_types)
        if excess > zips:
            h += excess - zips
        return h

    def _pair_glue(self, fn: str, live_types: Sequence[int]) -> float:
        """Least glue to make two live streams zippable into `fn`'s input (0 if no two can be).

        For each ordered pair whose fields (a tuple stream's own, or one field a
        plain stream can be glued to) make up the input, the cheapest common
        shape: either stream's shape or a shortest common supersequence of both.
        """
        key = (fn, tuple(sorted(live_types)))
        cached = self._pair_glue_cache.get(key)
        if cached is not None:
            return cached
        best = INF
        for i, ti in enumerate(live_types):
            for j, tj in enumerate(live_types):
                if i != j:
                    best = min(best, self._pair_cost(fn, ti, tj))
        result = 0.0 if best == INF else best
        self._pair_glue_cache[key] = result
        return result

    def _pair_cost(self, fn: str, ti: int, tj: int) -> float:
        """Least glue to zip a stream of type `ti` (first) with one of type `tj` into `fn`'s input."""
        key = (fn, ti, tj)
        cached = self._pair_cost_cache.get(key)
        if cached is not None:
            return cached
        fields = self.tables.fn_fields[fn]
        best = INF
        si, sj = self.tables.types[ti], self.tables.types[tj]
        ni = len(si.elem.items) if isinstance(si.elem, TupleType) else 1
        nj = len(sj.elem.items) if isinstance(sj.elem, TupleType) else 1
        pi, pj = fields[:ni], fields[ni:]
        if ni + nj == len(fields) and not (ni > 1 and tuple(si.elem.items) != pi) \
                and not (nj > 1 and tuple(sj.elem.items) != pj):
            ei = si.elem if ni > 1 else pi[0]
            ej = sj.elem if nj > 1 else pj[0]
            for shape in self._common_shapes(ti, tj):
                c = self.dist(ti, self.target(("exact", ei, shape))) \
                    + self.dist(tj, self.target(("exact", ej, shape)))
                best = min(best, c)
        self._pair_cost_cache[key] = best
        return best

    def _common_shapes(self, ti: int, tj: int) -> list:
        """Either stream's shape and the shortest common supersequences of the two (cached)."""
        key = (ti, tj)
        cached = self._common_cache.get(key)
        if cached is None:
            a, b = self.tables.types[ti].shape, self.tables.types[tj].shape
            cached = [a] if a == b else [a, b] + [x for x in common_supersequences(a, b) if x not in (a, b)]
            self._common_cache[key] = cached
        return cached
