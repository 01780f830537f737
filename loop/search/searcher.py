"""One best-first search over one task: its frontier, budget, noise and the programs it emits.

`Search.steps()` runs the weighted A* of the package docstring one expansion
at a time, so a portfolio (loop/search/portfolio.py) can interleave several
searches of one task; they share the task's `TaskTables` and each has its
own prior, heuristic weight, noise generator and statistics.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from stepforge.loop.search.config import SearchConfig
from stepforge.loop.search.distance import INF
from stepforge.loop.search.emit import assignments, check, emit, is_goal
from stepforge.loop.search.prior import BOS, OpPrior, fn_order_category, make_token
from stepforge.loop.search.results import Candidate, SearchStats
from stepforge.loop.search.tables import GLUE_OPS, TaskTables


class State:
    """A search node: the live terms and the path that made them."""

    __slots__ = ("live", "g", "depth", "parent", "move", "created", "used", "ctx", "copies")

    def __init__(self, live, g, depth, parent, move, created, used, ctx, copies):
        self.live = live  # sorted tuple of term ids (a multiset)
        self.g = g
        self.depth = depth  # operator applications so far (Copies excluded)
        self.parent = parent
        self.move = move
        self.created = created  # frozenset of term ids made on this path
        self.used = used  # tuple: applications per fn (file order)
        self.ctx = ctx  # the last two prior tokens
        self.copies = copies


@dataclass(frozen=True)
class Move:
    """The move that made a state from its parent."""

    kind: str  # "op" or "route"
    op: str
    kwargs: tuple  # program keyword arguments ((key, value), ...)
    inputs: tuple  # ((term id, borrowed), ...)
    out: int  # the term made
    fns: tuple = ()  # route: the expert fns in route order
    merge_fn: str = ""


class Search:
    """One search over one task; `run()` yields candidates in the order found."""

    def __init__(self, tables: TaskTables, prior: OpPrior, config: SearchConfig, *, n: int,
                 temperature: float, seed: int, weight: Optional[float] = None):
        self.tables = tables
        self.prior = prior
        self.config = config
        self.n = n
        self.temperature = max(0.0, float(temperature))
        self.rng = random.Random(seed)
        self.stats = SearchStats()
        self.weight = config.heuristic_weights[0] if weight is None else weight

    def run(self) -> Iterator[Candidate]:
        """The candidates, in the order found."""
        for item in self.steps():
            if item is not None:
                yield item

    def steps(self) -> Iterator[Optional[Candidate]]:
        """The search, one expansion at a time: yields a Candidate when one is found, None after each expansion.

        Budgets count this search's own work (expansions, and seconds spent
        inside this generator), so several searches can be interleaved.
        """
        tables, targets = self.tables, self.tables.targets
        busy = 0.0
        resumed = time.perf_counter()
        root = State(tuple(sorted(tables.input_terms)), 0.0, 0, None, None, frozenset(tables.input_terms),
                     tuple(0 for _ in tables.fn_names), (BOS, BOS), 0)
        counter = itertools.count()
        h0 = targets.heuristic(root)
        if h0 == INF:
            self.stats.stopped = "exhausted"
            return
        w = self.weight
        open_heap: list = [(w * h0, h0, next(counter), root)]
        best_g: dict[tuple, float] = {root.live: 0.0}
        seen_texts: set[str] = set()
        since_expansions = 0
        since_busy = 0.0
        while open_heap:
            now = time.perf_counter()
            if since_expansions >= self.config.max_expansions:
                self.stats.stopped = "expansions"
                break
            if busy + (now - resumed) - since_busy >= self.config.max_seconds:
                self.stats.stopped = "seconds"
                break
            *_, state = heapq.heappop(open_heap)
            if best_g.get(state.live, INF) < state.g:
                continue
            if is_goal(tables, state):
                for assignment in assignments(tables, state):
                    text, n_lines = emit(tables, state, assignment)
                    if text in seen_texts:
                        continue
                    seen_texts.add(text)
                    if not check(tables.task, text):
                        self.stats.rejected += 1
                        continue
                    self.stats.candidates += 1
                    now = time.perf_counter()
                    busy += now - resumed
                    self.stats.seconds = busy
                    yield Candidate(text, state.g, self.stats.expansions, busy, n_lines)
                    resumed = time.perf_counter()
                    since_expansions = 0
                    since_busy = busy
                    if self.stats.candidates >= self.n:
                        self.stats.stopped = "n"
                        return
                continue
            self.stats.expansions += 1
            since_expansions += 1
            for child in self._children(state):
                if child.g >= best_g.get(child.live, INF):
                    continue
                ch = targets.heuristic(child)
                if ch == INF:
                    continue
                best_g[child.live] = child.g
                heapq.heappush(open_heap, (child.g + w * ch, ch, next(counter), child))
            now = time.perf_counter()
            busy += now - resumed
            self.stats.seconds = busy
            yield None
            resumed = time.perf_counter()
        else:
            self.stats.stopped = "exhausted"
        self.stats.seconds = busy + (time.perf_counter() - resumed)

    def _children(self, state: State) -> Iterator[State]:
        """The well-typed successors of `state`: glue, fn applications, Zips, RepeatRefs and routes."""
        tables = self.tables
        live = state.live
        distinct = sorted(set(live))
        live_targets = dict(zip(live, tables.targets.live_targets(state)))
        can_copy = state.copies < self.config.max_copies
        at_limit = state.depth >= self.config.max_statements
        if at_limit:
            return
        for term in distinct:
            tid = tables.term_type[term]
            targets = live_targets[term]
            modes = (False, True) if can_copy and tables.borrowable(term) else (False,)
            # glue
            ancestors = None
            for op, kwargs, out in tables.glue_options(tid):
                if not tables.targets.relevant(tid, out, targets):
                    continue
                if ancestors is None:
                    ancestors = tables.glue_ancestors(term)
                if out in ancestors:
                    continue
                glue_modes = modes if tables.term_op[term] not in GLUE_OPS else (False,)
                for borrowed in glue_modes:
                    child = self._make_child(state, "op", op, kwargs, ((term, borrowed),), out, None)
                    if child is not None:
                        yield child
            # fn applications
            for op, kwargs, out, fn in tables.fn_options(tid):
                if state.used[tables.fn_index[fn]] >= self.config.max_fn_uses:
                    continue
                for borrowed in modes:
                    child = self._make_child(state, "op", op, kwargs, ((term, borrowed),), out, fn)
                    if child is not None:
                        yield child
        # pairs
        for t1 in distinct:
            for t2 in distinct:
                if t1 == t2:
                    continue
                ty1, ty2 = tables.term_type[t1], tables.term_type[t2]
                for op, extra, out in tables.pair_options(ty1, ty2):
                    if op == "Zip":
                        m1 = (False, True) if can_copy and tables.borrowable(t1) else (False,)
                        m2 = (False, True) if can_copy and tables.borrowable(t2) else (False,)
                        for b1 in m1:
                            for b2 in m2:
                                if b1 and b2 and state.copies + 2 > self.config.max_copies:
                                    continue
                                child = self._make_child(state, "op", "Zip", (), ((t1, b1), (t2, b2)), out, None)
                                if child is not None:
                                    yield child
                    elif op == "RepeatRef":
                        if not tables.targets.relevant(ty1, out, live_targets[t1]):
                            continue
                        if out in tables.glue_ancestors(t1):
                            continue
                        m2 = (False, True) if can_copy else (False,)
                        for b2 in m2:
                            child = self._make_child(state, "op", "RepeatRef", (), ((t1, False), (t2, b2)), out, None)
                            if child is not None:
                                yield child
                    elif op == "route":
                        group, merge = extra
                        if state.used[tables.fn_index[group[0]]]:
                            continue
                        if state.copies + 1 > self.config.max_copies:
                            continue
                        child = self._make_child(state, "route", "Route", (("group", group), ("merge", merge)),
                                                 ((t1, False), (t2, False)), out, merge, group=group)
                        if child is not None:
                            yield child

    def _make_child(self, state: State, kind: str, op: str, kwargs: tuple, inputs: tuple, out_type: int,
                    fn: Optional[str], group: tuple[str, ...] = ()) -> Optional[State]:
        """The state after one move (None if it remakes a term of the path or exceeds the live limit), priced."""
        tables = self.tables
        children = tuple(t for t, _ in inputs)
        key = (op, kwargs, children)
        parent = children[0] if op in GLUE_OPS else -1
        term = tables.intern_term(key, op if kind == "op" else "Route", out_type, parent)
        if term in state.created or term in state.live:
            return None
        live = list(state.live)
        for t, borrowed in inputs:
            if not borrowed:
                live.remove(t)
        live.append(term)
        if len(live) > len(tables.output_types) + self.config.max_live_extra:
            return None
        live_t = tuple(sorted(live))
        # cost: tokens under the prior, in context
        borrowed_n = sum(1 for _, b in inputs if b)
        tokens: list[str] = ["Copy"] * borrowed_n
        if kind == "route":
            tokens.append("Partition")  # the Copy of the route, the fn list, the per-route Map and the Merge are forced
        else:
            tokens.append(make_token(op, {k: v for k, v in kwargs if k in ("a", "b", "L")}))
        cost = 0.0
        ctx = state.ctx
        for tok in tokens:
            cost += self.prior.cost(tok, ctx)
            ctx = (ctx[-1], tok)
        if kind == "route":
            ctx = ("[Map]", "Merge")
        used = state.used
        applied = list(group) if group else ([fn] if fn else [])
        if kind == "route" and fn:
            applied.append(fn)
        if applied:
            used_l = list(used)
            if self.config.fn_order:
                order_idx = min(tables.fn_index[a] for a in applied)
                prev = [i for i, c in enumerate(used) if c]
                reused = any(used[tables.fn_index[a]] for a in applied)
                cost += self.prior.fn_order_cost(fn_order_category(order_idx, prev, reused))
            for a in applied:
                used_l[tables.fn_index[a]] += 1
            used = tuple(used_l)
        if self.temperature > 0 and self.config.noise > 0:
            cost += self.temperature * self.config.noise * self.rng.expovariate(1.0)
        copies = state.copies + borrowed_n + (1 if kind == "route" else 0)
        move = Move(kind, op, kwargs, inputs, term, fns=group, merge_fn=(fn or "") if kind == "route" else "")
        self.stats.generated += 1
        return State(live_t, state.g + cost, state.depth + 1, state, move, state.created | {term}, used, ctx, copies)
