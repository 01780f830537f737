"""A search-based proposer that needs no model: type-directed synthesis of STeP programs.

`SearchProposer` implements the `Proposer` contract (loop/interfaces.py) with
a best-first (weighted A*) search over well-typed programs. It is what
`stepforge improve` uses when no model is configured.

The search
----------
A search state is the multiset of *live* streams: typed streams not yet
consumed (the task's inputs at the start). A move applies one operator to
live streams and makes new ones; every move is typed by the simulator's own
rules (`stepforge.simulator.ops.resolve_params` / `infer` with a
`TypeContext`), so only well-typed programs are ever built. Moves are

* fn applications: `Map(fn=f)` of a non-fold fn on a stream whose element
  type is `f`'s input, `Accum(fn=f, b=k)` / `Scan(fn=f, b=k)` of a fold fn;
* `Zip` of two equal-shaped streams whose fields are a contiguous part of
  some fn's input (so a Zip is only made to feed a fn);
* glue that adapts one stream toward a target type: `Bufferize`,
  `Streamify`, `Promote`, `Repeat(n=<a size of the task>)`, `Flatten`,
  `RepeatRef` (and `Reshape` if `allow_reshape`). A glue move is only made
  if it brings the stream strictly closer to some target (a fn input type,
  an output's type and shape, or the shape of a stream it must be zipped
  with) by the glue distance below, and never back to a type it already had;
* routing: with a Multihot stream of width E and a group of E fns with equal
  types (the experts), the Partition -> `[Map(fn=f) for p, f in zip(parts,
  fns)]` -> Merge pattern as one move (its index stream is copied).

Affinity holds by construction: a move either *consumes* an input stream or
*borrows* it, which is emitted as `a, b = step.Copy().apply(x)` (one copy is
used, the other stays live). A goal is a state whose live streams are exactly
the task's outputs (types and symbolic shapes; every other stream was
consumed) and in which every task fn has been applied. Each goal gives one
candidate per way of assigning its streams to the outputs.

Order and heuristic: a move costs `-log P` of its tokens under the prior
(loop/search/prior.py: a trigram over operator tokens plus a fn-order model,
learned from the demonstrations), plus, at temperature T > 0,
`T * noise * Exp(1)` of seeded noise (so T = 0 is the prior's order, larger T
is flatter, and a seed fixes the order). States are expanded in order of
`g + w * h` (w from `heuristic_weights`), where `h` counts the glue each live stream still
needs to reach its nearest target (an alignment of its dims, innermost first,
against the target's, costing Repeat/Promote insertions, Flatten merges and
the Bufferize/Streamify moves of the buffer boundary), one application per
unused fn, one Zip per fn whose input no live stream has yet, and the live
streams in excess of the outputs. A live stream that no target can be reached
from (wrong leaf type, a dim glue cannot remove) makes the state dead.

Portfolio: one request runs several searches of the same task side by side
(sharing all typing and distance tables): one per heuristic weight in
`heuristic_weights` (the first follows the prior closely, a larger one is
greedier and reaches long programs sooner), and, with demonstrations, one
more under the base prior at the first weight (`base_share` of the samples).
Expansions are interleaved; candidates are given in proportion to the
members' shares (a member stuck for `_PATIENCE` expansions does not hold back
what another found); duplicates are dropped.

Learning from experience: the prior is fitted on the demonstrations' impls,
so earned programs make the operator sequences they contain cheap and later
searches reach similar programs in far fewer expansions. Because the type
system cannot tell apart many wrong programs from the right one, any prior
only re-orders candidates; the base-prior member makes sure demonstrations
cannot push a program the base prior finds out of reach: what it finds as
its k-th program is in the portfolio's list by about the (k / base_share)-th.

Budget: for each sample, each search of the portfolio may take at most
`max_expansions` expansions and `max_seconds` seconds of its own work after
its previous program; the portfolio stops at `n` distinct programs or when
every search has spent its budget. With the expansion budget binding, the
result is a function of (task, demonstrations, n, temperature, seed, config).

Every emitted program is parsed, type-checked (`typecheck_program`) against
the task's types, checked for the affine rule and for the declared output
types before it is returned; the proposer cannot run programs (the loop's
verifier does), so this static check is its whole pre-ranking.

Known limits (measured by scripts/bench_search.py). Types cannot tell apart
programs that wire fns of equal types differently (which of two fp32 streams
is divided by which, whether a statistic is a running Scan or an Accum
repeated back): norm/G_0_8_01 and norm/G_0_9_02 are found only after
hundreds of well-typed wrong candidates, which the verifier has to reject.
norm/G_0_16_01 (16 statements, three Copies, four fns applied twice) is out
of reach: too many equally typed wirings. moe-end-to-end/G_0_12_01 is not
found cold: the heuristic only looks one fn ahead, so the glue between two
future fn applications (Promote/Bufferize before, Streamify/Flatten after a
top-3 over tokens) is not anticipated; with demonstrations that contain that
chain (moe-index/G_0_7_03) it is found at once.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from stepforge.loop.interfaces import Demonstration, Proposal, ProposalRequest, Proposer
from stepforge.loop.search.prior import OpPrior, fn_order_category, make_token
from stepforge.loop.search.task import SearchTask, SearchTaskError, fields_of
from stepforge.simulator.errors import SimulatorError, StepTypeError
from stepforge.simulator.interpreter import typecheck_program
from stepforge.simulator.ops import StreamList, TypeContext, infer, resolve_params
from stepforge.simulator.program import NameRef, OpCall, SizeExpr, check_affine, format_kwargs, parse_program
from stepforge.simulator.shapes import Dim
from stepforge.simulator.types import BufferType, MultihotType, TupleType
from stepforge.simulator.values import StreamType

INF = math.inf
GLUE_OPS = ("Bufferize", "Streamify", "Promote", "Repeat", "Flatten", "Reshape", "RepeatRef")
FN_OPS = ("Map", "Accum", "Scan")


class SearchConfig(BaseModel):
    """Settings of the search proposer; every key has a default."""

    model_config = ConfigDict(extra="forbid")

    max_expansions: int = Field(default=6000, ge=1, description="per sample and search of the portfolio: "
                                "expansions allowed after its previous program")
    max_seconds: float = Field(default=15.0, gt=0, description="per sample and search of the portfolio: seconds "
                               "(of its own work) allowed after its previous program")
    heuristic_weights: list[float] = Field(default_factory=lambda: [2.0, 4.0], min_length=1,
                                           description="nats per estimated remaining operator; one search per "
                                           "weight, interleaved (the first follows the prior, larger ones are greedier)")
    noise: float = Field(default=1.5, ge=0, description="scale (nats) of the per-move Exp(1) noise at temperature 1")
    max_statements: int = Field(default=16, ge=1, description="operator applications per program (Copies excluded)")
    max_live_extra: int = Field(default=3, ge=0, description="live streams allowed beyond the number of outputs")
    max_fn_uses: int = Field(default=2, ge=1, description="times one fn may be applied")
    max_copies: int = Field(default=4, ge=0, description="Copy operations per program")
    allow_reshape: bool = Field(default=False, description="also try Reshape as glue")
    mix: float = Field(default=0.25, ge=0, le=1, description="weight of the base prior in the learned prior")
    fn_order: bool = Field(default=True, description="cost fn applications by the task's fn order")
    max_demonstrations: int = Field(default=64, ge=0, description="most demonstrations the prior is fitted on")
    similarity_floor: float = Field(default=0.25, ge=0, le=1, description="weight of a demonstration of a task "
                                    "unlike the target (1: every demonstration counts fully)")
    base_share: float = Field(default=0.25, ge=0, lt=1, description="with demonstrations: share of the samples "
                              "drawn from a second search in the base prior's order, so demonstrations cannot hide "
                              "what the base prior finds (0: learned prior only)")


# ---------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """One program the search found."""

    text: str
    cost: float  # -log prior of its moves (with noise at T > 0)
    expansions: int  # states expanded when it was found (total for this search)
    seconds: float  # search seconds when it was found (total for this search)
    statements: int  # operator applications (Copies included)


@dataclass
class SearchStats:
    expansions: int = 0
    generated: int = 0
    candidates: int = 0
    rejected: int = 0  # emitted programs that failed the final static check (should stay 0)
    seconds: float = 0.0
    stopped: str = ""  # "n", "expansions", "seconds", "exhausted"


# ---------------------------------------------------------------------------
# states


class _State:
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
class _Move:
    kind: str  # "op" or "route"
    op: str
    kwargs: tuple  # program keyword arguments ((key, value), ...)
    inputs: tuple  # ((term id, borrowed), ...)
    out: int  # the term made
    fns: tuple = ()  # route: the expert fns in route order
    merge_fn: str = ""


# ---------------------------------------------------------------------------
# the searcher


class _Searcher:
    """One search over one task; `run()` yields candidates in the order found."""

    # task-derived tables that searchers of the same task (a portfolio) can share
    _SHARED = ("ctx", "dims", "fn_names", "fn_index", "types", "type_ids", "term_keys", "term_op", "term_type",
               "term_parent", "input_terms", "output_types", "output_counter", "_infer_cache", "_dist_cache",
               "_targets", "_target_ids", "_glue_cache", "_fn_cache", "_pair_cache", "_targets_cache",
               "_partner_type", "_pair_glue_cache", "_pair_cost_cache", "_common_cache", "_h_cache", "_lt_cache",
               "_eff_cache", "_relevant_cache", "fold_fns", "expert_groups", "expert_fns", "map_fns", "fn_fields",
               "_fields_ids", "_type_fields_id", "_fn_fields_id")

    def __init__(self, task: SearchTask, prior: OpPrior, config: SearchConfig, *, n: int,
                 temperature: float, seed: int, weight: Optional[float] = None,
                 share_with: Optional["_Searcher"] = None):
        self.task = task
        self.prior = prior
        self.config = config
        self.n = n
        self.temperature = max(0.0, float(temperature))
        self.rng = random.Random(seed)
        self.stats = SearchStats()
        self.weight = config.heuristic_weights[0] if weight is None else weight
        self.max_expansions = config.max_expansions
        self.max_seconds = config.max_seconds
        if share_with is not None:
            for name in self._SHARED:
                setattr(self, name, getattr(share_with, name))
            return
        self.ctx = TypeContext(fns=task.fns, binding=dict(task.binding))
        self.dims = _DimTable(task.sizes)
        self.fn_names = list(task.fns)
        self.fn_index = {name: i for i, name in enumerate(self.fn_names)}
        # interned types and terms
        self.types: list[StreamType] = []
        self.type_ids: dict[StreamType, int] = {}
        self.term_keys: dict[tuple, int] = {}
        self.term_op: list[str] = []
        self.term_type: list[int] = []
        self.term_parent: list[int] = []  # the input term of a single-input glue op, else -1
        self.input_terms: list[int] = []
        for name, st in task.inputs:
            self.input_terms.append(self._term(("input", name), "input", self._type(st), -1))
        self.output_types = [self._type(st) for _, st in task.outputs]
        self.output_counter = Counter(self.output_types)
        # caches
        self._infer_cache: dict[tuple, Any] = {}
        self._dist_cache: dict[tuple[int, int], float] = {}
        self._targets: list[tuple] = []
        self._target_ids: dict[tuple, int] = {}
        self._glue_cache: dict[int, list] = {}
        self._fn_cache: dict[int, list] = {}
        self._pair_cache: dict[tuple[int, int], list] = {}
        self._targets_cache: dict[tuple, tuple] = {}
        self._partner_type: dict[int, bool] = {}
        self._pair_glue_cache: dict[tuple, float] = {}
        self._pair_cost_cache: dict[tuple, float] = {}
        self._common_cache: dict[tuple, list] = {}
        self._h_cache: dict[tuple, float] = {}
        self._lt_cache: dict[tuple, list] = {}
        self._eff_cache: dict[tuple, float] = {}
        self._relevant_cache: dict[tuple, bool] = {}
        self._classify_fns()

    # -- interning --------------------------------------------------------------
    def _type(self, st: StreamType) -> int:
        tid = self.type_ids.get(st)
        if tid is None:
            tid = len(self.types)
            self.types.append(st)
            self.type_ids[st] = tid
        return tid

    def _term(self, key: tuple, op: str, type_id: int, parent: int) -> int:
        tid = self.term_keys.get(key)
        if tid is None:
            tid = len(self.term_op)
            self.term_keys[key] = tid
            self.term_op.append(op)
            self.term_type.append(type_id)
            self.term_parent.append(parent)
        return tid

    # -- fns ----------------------------------------------------------------------
    def _classify_fns(self) -> None:
        fns = self.task.fns
        self.fold_fns = [n for n, f in fns.items() if f.is_fold]
        plain = [n for n, f in fns.items() if not f.is_fold]
        widths = self.task.multihot_widths()
        groups: dict[tuple, list[str]] = {}
        for name in plain:
            f = fns[name]
            groups.setdefault((fields_of(f.input_type), fields_of(f.output_type)), []).append(name)
        self.expert_groups: list[tuple[str, ...]] = []
        for (ins, outs), names in groups.items():
            if len(names) >= 2 and len(names) in widths:
                merges = [m for m in self.fold_fns if fields_of(fns[m].input_type) == outs]
                if merges:
                    self.expert_groups.append(tuple(names))
        self.expert_fns = {n for g in self.expert_groups for n in g}
        self.map_fns = [n for n in plain if n not in self.expert_fns]
        self.fn_fields = {n: fields_of(f.input_type) for n, f in fns.items()}
        self._fields_ids: dict[tuple, int] = {}
        self._type_fields_id: dict[int, int] = {}
        self._fn_fields_id = {n: self._fields_ids.setdefault(f, len(self._fields_ids)) for n, f in self.fn_fields.items()}

    # -- typing (the simulator's rules) ------------------------------------------
    def _infer(self, op: str, kwargs: tuple, arg_types: Any):
        """Output type id(s) of `op(kwargs)` on argument type ids, or None if it does not type-check."""
        key = (op, kwargs, arg_types)
        if key in self._infer_cache:
            return self._infer_cache[key]
        call = OpCall(op, kwargs, 0)

        def build(a):
            if isinstance(a, tuple):
                return tuple(build(x) for x in a)
            return self.types[a]

        try:
            params = resolve_params(call, self.ctx)
            out = infer(call, build(arg_types), params, self.ctx)
        except StepTypeError:
            result = None
        else:
            result = tuple(self._type(o) for o in out) if isinstance(out, list) else self._type(out)
        self._infer_cache[key] = result
        return result

    def _route_type(self, data: int, idx: int, group: tuple[str, ...], merge: str) -> Optional[int]:
        """The Merge output of Partition -> per-route Map -> Merge, typed op by op, or None."""
        key = ("route", data, idx, group, merge)
        if key in self._infer_cache:
            return self._infer_cache[key]
        result = None
        try:
            width = self.types[idx].elem.width
            n_kw = self._size_kw(width)
            part_call = OpCall("Partition", (("N", n_kw),), 0)
            parts = infer(part_call, (self.types[data], self.types[idx]), resolve_params(part_call, self.ctx), self.ctx)
            outs = []
            for p, fn in zip(parts, group):
                map_call = OpCall("Map", (("fn", NameRef(fn)),), 0)
                outs.append(infer(map_call, p, resolve_params(map_call, self.ctx), self.ctx))
            if len(outs) == len(parts):
                merge_call = OpCall("Merge", (("fn", NameRef(merge)),), 0)
                out = infer(merge_call, (StreamList(tuple(outs)), self.types[idx]),
                            resolve_params(merge_call, self.ctx), self.ctx)
                result = self._type(out)
        except (StepTypeError, AttributeError):
            result = None
        self._infer_cache[key] = result
        return result

    def _size_kw(self, dim) -> Any:
        """A size as a keyword value: an int, a symbol's `X_value`-free name, or a product."""
        dim = dim if isinstance(dim, Dim) else Dim.sym(str(dim))
        if dim.is_const and dim.coeff.denominator == 1:
            return int(dim.coeff)
        factors: list = []
        if dim.coeff != 1:
            if dim.coeff.denominator != 1:
                raise StepTypeError(f"size {dim} is not whole")
            factors.append(int(dim.coeff))
        for name, power in dim.powers:
            if power < 0:
                raise StepTypeError(f"size {dim} is not a product")
            factors.extend([NameRef(name)] * power)
        return factors[0] if len(factors) == 1 else SizeExpr(tuple(factors))

    # -- targets and the glue distance --------------------------------------------
    def _target(self, t: tuple) -> int:
        tid = self._target_ids.get(t)
        if tid is None:
            tid = len(self._targets)
            self._targets.append(t)
            self._target_ids[t] = tid
        return tid

    def _pre_target(self, leaf, min_sd: int) -> int:
        if isinstance(leaf, BufferType):
            return self._target(("pre", leaf.inner, leaf.dims, min_sd))
        return self._target(("pre", leaf, (), min_sd))

    def _fields_id(self, type_id: int) -> int:
        """An int naming the type's field tuple (equal field tuples, equal ids)."""
        r = self._type_fields_id.get(type_id)
        if r is None:
            r = self._fields_ids.setdefault(fields_of(self.types[type_id].elem), len(self._fields_ids))
            self._type_fields_id[type_id] = r
        return r

    def _is_partner_type(self, type_id: int) -> bool:
        """Whether streams of this type fill part of some multi-field fn input (a zip partner)."""
        cached = self._partner_type.get(type_id)
        if cached is None:
            elem_fields = fields_of(self.types[type_id].elem)
            cached = any(len(f) > 1 and _chunk_span(elem_fields, f) for f in self.fn_fields.values())
            self._partner_type[type_id] = cached
        return cached

    def _stream_targets(self, type_id: int, others: tuple[int, ...], used: tuple[int, ...]) -> tuple:
        """((target id, extra cost), ...) for one live stream, given the other live streams' types.

        Targets: each fn's input (its fields; for a multi-field input, the
        exact shape of a live zip partner when there is one), at extra cost 1
        for a fn already applied (applying it again is one more operator) and
        left out once a fn is at `max_fn_uses`; the Multihot index of an
        unused expert group; and every output's exact type and shape.
        """
        partners = others  # the caller passes the sorted distinct partner types of the other live streams
        key = (type_id, partners, used)
        cached = self._targets_cache.get(key)
        if cached is not None:
            return cached
        targets: dict[int, int] = {}

        def add(target_id: int, extra: int):
            if targets.get(target_id, INF) > extra:
                targets[target_id] = extra

        for name in self.fn_names:
            count = used[self.fn_index[name]]
            if count >= self.config.max_fn_uses:
                continue
            if name in self.expert_fns and count:
                continue
            extra = 1 if count else 0
            fields = self.fn_fields[name]
            min_sd = 2 if self.task.fns[name].is_fold else 1
            if len(fields) == 1:
                add(self._pre_target(fields[0], min_sd), extra)
                continue
            add(self._target(("fn", fields, min_sd)), extra)
            for i, field_type in enumerate(fields):
                shapes = []
                for p in partners:
                    st = self.types[p]
                    span = _chunk_span(fields_of(st.elem), fields)
                    if span and not (span[0] <= i < span[1]):
                        # the partner's shape, or (both sides broadcast) a common supersequence
                        shapes.extend(self._common_shapes(p, type_id)[:1] + self._common_shapes(type_id, p)[2:])
                if shapes:
                    for shape in shapes:
                        add(self._target(("exact", field_type, shape)), extra)
                else:
                    add(self._pre_target(field_type, min_sd), extra)
        for g in self.expert_groups:
            if not used[self.fn_index[g[0]]]:
                add(self._target(("multihot", len(g))), 0)
        for tid in self.output_types:
            st = self.types[tid]
            add(self._target(("exact", st.elem, st.shape)), 0)
        result = tuple(sorted(targets.items()))
        self._targets_cache[key] = result
        return result

    def _live_targets(self, state: "_State") -> list[tuple]:
        """The targets of each live stream of `state`, in `state.live` order."""
        cached = self._lt_cache.get((state.live, state.used))
        if cached is not None:
            return cached
        types = [self.term_type[t] for t in state.live]
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

    def _dist(self, type_id: int, target_id: int) -> float:
        key = (type_id, target_id)
        d = self._dist_cache.get(key)
        if d is None:
            d = self._compute_dist(self.types[type_id], self._targets[target_id])
            self._dist_cache[key] = d
        return d

    def _compute_dist(self, st: StreamType, target: tuple) -> float:
        kind = target[0]
        elem = st.elem
        if kind == "fn":
            _, fields, min_sd = target
            if not isinstance(elem, TupleType):
                return INF
            if not _chunk_span(elem.items, fields):
                return INF
            return max(0, min_sd - len(st.shape))
        if kind == "multihot":
            return 0 if isinstance(elem, MultihotType) and _width(elem, self.task.binding) == target[1] else INF
        dims = self.dims
        if kind == "pre":
            _, leaf, bdims, min_sd = target
            if isinstance(elem, TupleType):
                return INF
            leaf_s, full, p0 = _decompose(st)
            if leaf_s != leaf:
                return INF
            return _prefix_distance(dims.ids(full), p0, dims.ids(bdims), min_sd, dims)
        if kind == "exact":
            _, t_elem, t_shape = target
            if isinstance(elem, TupleType) or isinstance(t_elem, TupleType):
                if elem != t_elem:
                    return INF
                return _full_distance(dims.ids(st.shape), 0, dims.ids(t_shape), 0, dims, tuple_mode=True)
            leaf_s, full, p0 = _decompose(st)
            leaf_t, t_full, p_t = _decompose(StreamType(t_elem, tuple(t_shape)))
            if leaf_s != leaf_t:
                return INF
            return _full_distance(dims.ids(full), p0, dims.ids(t_full), p_t, dims)
        raise AssertionError(kind)

    def _eff_dist(self, type_id: int, targets: tuple) -> float:
        key = (type_id, targets)
        d = self._eff_cache.get(key)
        if d is None:
            d = min((self._dist(type_id, t) + extra for t, extra in targets), default=INF)
            self._eff_cache[key] = d
        return d

    def _relevant(self, before: int, after: int, targets: tuple) -> bool:
        """Whether glue from type `before` to `after` brings the stream strictly closer to some target."""
        key = (before, after, targets)
        r = self._relevant_cache.get(key)
        if r is None:
            r = any(self._dist(after, t) < self._dist(before, t) for t, _ in targets)
            self._relevant_cache[key] = r
        return r

    def _heuristic(self, state: _State) -> float:
        h = self._h_cache.get(state.live)
        if h is None:
            h = self._compute_heuristic(state)
            self._h_cache[state.live] = h
        return h

    def _compute_heuristic(self, state: _State) -> float:
        glue = 0.0
        for term, targets in zip(state.live, self._live_targets(state)):
            d = self._eff_dist(self.term_type[term], targets)
            if d == INF:
                return INF
            glue += d
        live_types = [self.term_type[t] for t in state.live]
        live_fields = {self._fields_id(t) for t in live_types}
        zips = 0
        h = 0.0
        pair_glue = 0.0
        for name in self.fn_names:
            if state.used[self.fn_index[name]]:
                continue
            if name in self.expert_fns:
                continue
            h += 1
            fields = self.fn_fields[name]
            if len(fields) > 1 and self._fn_fields_id[name] not in live_fields:
                h += 1
                zips += 1
                pair_glue += self._pair_glue(name, live_types)
        h += max(glue, pair_glue)
        for g in self.expert_groups:
            if not state.used[self.fn_index[g[0]]]:
                h += 1  # one route move (Partition, per-route Map, Merge)
        excess = len(state.live) - len(self.output_types)
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
        key = (fn, ti, tj)
        cached = self._pair_cost_cache.get(key)
        if cached is not None:
            return cached
        fields = self.fn_fields[fn]
        best = INF
        if True:
            if True:
                si, sj = self.types[ti], self.types[tj]
                ni = len(si.elem.items) if isinstance(si.elem, TupleType) else 1
                nj = len(sj.elem.items) if isinstance(sj.elem, TupleType) else 1
                pi, pj = fields[:ni], fields[ni:]
                if ni + nj == len(fields) and not (ni > 1 and tuple(si.elem.items) != pi) \
                        and not (nj > 1 and tuple(sj.elem.items) != pj):
                    ei = si.elem if ni > 1 else pi[0]
                    ej = sj.elem if nj > 1 else pj[0]
                    for shape in self._common_shapes(ti, tj):
                        c = self._dist(ti, self._target(("exact", ei, shape))) \
                            + self._dist(tj, self._target(("exact", ej, shape)))
                        best = min(best, c)
        self._pair_cost_cache[key] = best
        return best

    def _common_shapes(self, ti: int, tj: int) -> list:
        """Either stream's shape and the shortest common supersequences of the two (cached)."""
        key = (ti, tj)
        cached = self._common_cache.get(key)
        if cached is None:
            a, b = self.types[ti].shape, self.types[tj].shape
            cached = [a] if a == b else [a, b] + [x for x in _common_supersequences(a, b) if x not in (a, b)]
            self._common_cache[key] = cached
        return cached

    # -- moves -------------------------------------------------------------------------
    def _glue_options(self, type_id: int) -> list[tuple[str, tuple, int]]:
        cached = self._glue_cache.get(type_id)
        if cached is not None:
            return cached
        st = self.types[type_id]
        rank = st.rank
        options: list[tuple[str, tuple]] = []
        if not isinstance(st.elem, TupleType):
            options += [("Bufferize", (("a", k),)) for k in range(1, rank + 1)]
        if isinstance(st.elem, BufferType):
            options.append(("Streamify", ()))
        options += [("Promote", (("b", k),)) for k in range(0, rank + 2)]
        options += [("Repeat", (("n", self._size_kw(d)),)) for d in self.task.sizes]
        for i in range(1, rank + 1):
            for j in range(i, rank + 1):
                options.append(("Flatten", (("L", tuple(range(i, j + 1))),)))
        if self.config.allow_reshape:
            for i in range(0, rank + 1):
                for d in self.task.sizes:
                    options.append(("Reshape", (("L", (i,)), ("S", self._size_kw(d)))))
        result = []
        for op, kwargs in options:
            out = self._infer(op, kwargs, type_id)
            if out is not None and out != type_id:
                result.append((op, kwargs, out))
        self._glue_cache[type_id] = result
        return result

    def _fn_options(self, type_id: int) -> list[tuple[str, tuple, int, str]]:
        cached = self._fn_cache.get(type_id)
        if cached is not None:
            return cached
        st = self.types[type_id]
        fields = fields_of(st.elem)
        result = []
        for name in self.map_fns:
            if self.fn_fields[name] == fields:
                kwargs = (("fn", NameRef(name)),)
                out = self._infer("Map", kwargs, type_id)
                if out is not None:
                    result.append(("Map", kwargs, out, name))
        for name in self.fold_fns:
            if self.fn_fields[name] != fields:
                continue
            for op in ("Accum", "Scan"):
                for k in range(1, st.rank + 1):
                    kwargs = (("fn", NameRef(name)), ("b", k))
                    out = self._infer(op, kwargs, type_id)
                    if out is not None:
                        result.append((op, kwargs, out, name))
        self._fn_cache[type_id] = result
        return result

    def _pair_options(self, t1: int, t2: int) -> list[tuple]:
        key = (t1, t2)
        cached = self._pair_cache.get(key)
        if cached is not None:
            return cached
        s1, s2 = self.types[t1], self.types[t2]
        result: list[tuple] = []
        zipped = fields_of(s1.elem) + fields_of(s2.elem)
        if s1.shape == s2.shape and any(_chunk_span(zipped, f) for f in self.fn_fields.values()):
            out = self._infer("Zip", (), (t1, t2))
            if out is not None:
                result.append(("Zip", (), out))
        if s2.rank == s1.rank + 1 and s2.shape[1:] == s1.shape:
            out = self._infer("RepeatRef", (), (t1, t2))
            if out is not None:
                result.append(("RepeatRef", (), out))
        if isinstance(s2.elem, MultihotType):
            width = _width(s2.elem, self.task.binding)
            for group in self.expert_groups:
                if len(group) != width or self.fn_fields[group[0]] != fields_of(s1.elem):
                    continue
                outs = fields_of(self.task.fns[group[0]].output_type)
                for merge in self.fold_fns:
                    if self.fn_fields[merge] != outs:
                        continue
                    out = self._route_type(t1, t2, group, merge)
                    if out is not None:
                        result.append(("route", (group, merge), out))
        self._pair_cache[key] = result
        return result

    def _glue_ancestors(self, term: int) -> set[int]:
        """Types along the chain of single-input glue ops that made `term` (itself included)."""
        seen = {self.term_type[term]}
        while self.term_op[term] in GLUE_OPS and self.term_parent[term] >= 0:
            term = self.term_parent[term]
            seen.add(self.term_type[term])
        return seen

    def _borrowable(self, term: int) -> bool:
        return self.term_op[term] not in ("Zip",)

    # -- expansion -------------------------------------------------------------------
    def _children(self, state: _State) -> Iterator[_State]:
        live = state.live
        distinct = sorted(set(live))
        live_targets = dict(zip(live, self._live_targets(state)))
        can_copy = state.copies < self.config.max_copies
        at_limit = state.depth >= self.config.max_statements
        if at_limit:
            return
        for term in distinct:
            tid = self.term_type[term]
            targets = live_targets[term]
            modes = (False, True) if can_copy and self._borrowable(term) else (False,)
            # glue
            ancestors = None
            for op, kwargs, out in self._glue_options(tid):
                if not self._relevant(tid, out, targets):
                    continue
                if ancestors is None:
                    ancestors = self._glue_ancestors(term)
                if out in ancestors:
                    continue
                glue_modes = modes if self.term_op[term] not in GLUE_OPS else (False,)
                for borrowed in glue_modes:
                    child = self._make_child(state, "op", op, kwargs, ((term, borrowed),), out, None)
                    if child is not None:
                        yield child
            # fn applications
            for op, kwargs, out, fn in self._fn_options(tid):
                if state.used[self.fn_index[fn]] >= self.config.max_fn_uses:
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
                ty1, ty2 = self.term_type[t1], self.term_type[t2]
                for op, extra, out in self._pair_options(ty1, ty2):
                    if op == "Zip":
                        m1 = (False, True) if can_copy and self._borrowable(t1) else (False,)
                        m2 = (False, True) if can_copy and self._borrowable(t2) else (False,)
                        for b1 in m1:
                            for b2 in m2:
                                if b1 and b2 and state.copies + 2 > self.config.max_copies:
                                    continue
                                child = self._make_child(state, "op", "Zip", (), ((t1, b1), (t2, b2)), out, None)
                                if child is not None:
                                    yield child
                    elif op == "RepeatRef":
                        if not self._relevant(ty1, out, live_targets[t1]):
                            continue
                        if out in self._glue_ancestors(t1):
                            continue
                        m2 = (False, True) if can_copy else (False,)
                        for b2 in m2:
                            child = self._make_child(state, "op", "RepeatRef", (), ((t1, False), (t2, b2)), out, None)
                            if child is not None:
                                yield child
                    elif op == "route":
                        group, merge = extra
                        if state.used[self.fn_index[group[0]]]:
                            continue
                        if state.copies + 1 > self.config.max_copies:
                            continue
                        child = self._make_child(state, "route", "Route", (("group", group), ("merge", merge)),
                                                 ((t1, False), (t2, False)), out, merge, group=group)
                        if child is not None:
                            yield child

    def _make_child(self, state: _State, kind: str, op: str, kwargs: tuple, inputs: tuple, out_type: int,
                    fn: Optional[str], group: tuple[str, ...] = ()) -> Optional[_State]:
        children = tuple(t for t, _ in inputs)
        key = (op, kwargs, children)
        parent = children[0] if op in GLUE_OPS else -1
        term = self._term(key, op if kind == "op" else "Route", out_type, parent)
        if term in state.created or term in state.live:
            return None
        live = list(state.live)
        for t, borrowed in inputs:
            if not borrowed:
                live.remove(t)
        live.append(term)
        if len(live) > len(self.output_types) + self.config.max_live_extra:
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
                order_idx = min(self.fn_index[a] for a in applied)
                prev = [i for i, c in enumerate(used) if c]
                reused = any(used[self.fn_index[a]] for a in applied)
                cost += self.prior.fn_order_cost(fn_order_category(order_idx, prev, reused))
            for a in applied:
                used_l[self.fn_index[a]] += 1
            used = tuple(used_l)
        if self.temperature > 0 and self.config.noise > 0:
            cost += self.temperature * self.config.noise * self.rng.expovariate(1.0)
        copies = state.copies + borrowed_n + (1 if kind == "route" else 0)
        move = _Move(kind, op, kwargs, inputs, term, fns=group, merge_fn=(fn or "") if kind == "route" else "")
        self.stats.generated += 1
        return _State(live_t, state.g + cost, state.depth + 1, state, move, state.created | {term}, used, ctx, copies)

    # -- goals -------------------------------------------------------------------------
    def _is_goal(self, state: _State) -> bool:
        if not all(state.used):
            return False
        if len(state.live) != len(self.output_types):
            return False
        return Counter(self.term_type[t] for t in state.live) == self.output_counter

    def _assignments(self, state: _State) -> list[tuple[int, ...]]:
        """Distinct ways to give each output a live term of its type (latest-made first for equal types)."""
        pools: list[list[int]] = []
        for tid in self.output_types:
            pools.append(sorted((t for t in set(state.live) if self.term_type[t] == tid), reverse=True))
        result = []
        seen = set()
        for combo in itertools.product(*pools):
            if Counter(combo) != Counter(t for t in state.live):
                continue
            if combo not in seen:
                seen.add(combo)
                result.append(combo)
        return result

    # -- emission ------------------------------------------------------------------------
    def _emit(self, state: _State, assignment: tuple[int, ...]) -> tuple[str, int]:
        moves = []
        s = state
        while s.parent is not None:
            moves.append(s.move)
            s = s.parent
        moves.reverse()
        reserved = set(self.fn_names) | {n for n, _ in self.task.inputs} | set(self.task.binding) \
            | {f"{k}_value" for k in self.task.binding} | {"step", "zip"}
        counters: Counter = Counter()
        names_used = set(reserved)

        def fresh(prefix: str) -> str:
            while True:
                counters[prefix] += 1
                name = f"{prefix}{counters[prefix]}"
                if name not in names_used:
                    names_used.add(name)
                    return name

        names: dict[int, list[str]] = {t: [n] for t, (n, _) in zip(self.input_terms, self.task.inputs)}
        lines: list[str] = []
        single_defs: set[str] = set()

        def take(term: int, borrowed: bool) -> str:
            var = names[term].pop(0)
            if borrowed:
                base = re.sub(r"_\d+$", "", var) + "_"
                a, b = fresh(base), fresh(base)
                lines.append(f"{a}, {b} = step.Copy().apply({var})")
                names[term].append(b)
                return a
            return var

        for mv in moves:
            if mv.kind == "op":
                args = [take(t, b) for t, b in mv.inputs]
                var = fresh(_PREFIX.get(mv.op, "s"))
                arg = args[0] if len(args) == 1 else "(" + ", ".join(args) + ")"
                lines.append(f"{var} = step.{mv.op}({format_kwargs(mv.kwargs)}).apply({arg})")
                single_defs.add(var)
            else:
                data = take(mv.inputs[0][0], mv.inputs[0][1])
                idx = names[mv.inputs[1][0]].pop(0)
                i0, i1 = fresh(idx + "_"), fresh(idx + "_")
                lines.append(f"{i0}, {i1} = step.Copy().apply({idx})")
                parts = fresh("parts")
                width = self.types[self.term_type[mv.inputs[1][0]]].elem.width
                lines.append(f"{parts} = step.Partition(N={_render_size_param(width, self.task.binding)}).apply(({data}, {i0}))")
                fl = fresh("expert_fns")
                lines.append(f"{fl} = [{', '.join(mv.fns)}]")
                outs = fresh("outs")
                lines.append(f"{outs} = [step.Map(fn=f).apply(p) for p, f in zip({parts}, {fl})]")
                var = fresh("merged")
                lines.append(f"{var} = step.Merge(fn={mv.merge_fn}).apply(({outs}, {i1}))")
                single_defs.add(var)
            names.setdefault(mv.out, []).append(var)
        returned = [names[t].pop(0) for t in assignment]
        text = "\n".join(lines + ["return " + ", ".join(returned)]) + "\n"
        # name the returned streams after the outputs where that is unambiguous
        for var, (out_name, _) in zip(returned, self.task.outputs):
            if var in single_defs and out_name not in names_used and returned.count(var) == 1:
                text = re.sub(rf"\b{re.escape(var)}\b", out_name, text)
                names_used.add(out_name)
        return text, len(lines)

    def _check(self, text: str) -> bool:
        try:
            program = parse_program(text)
            typed = typecheck_program(program, dict(self.task.inputs), self.task.fns, self.task.binding)
        except SimulatorError:
            return False
        if check_affine(program):
            return False
        return [t for t in typed.outputs] == [st for _, st in self.task.outputs]

    # -- the search loop -------------------------------------------------------------------
    def run(self) -> Iterator[Candidate]:
        """The candidates, in the order found."""
        for item in self.steps():
            if item is not None:
                yield item

    def steps(self) -> Iterator[Optional[Candidate]]:
        """The search, one expansion at a time: yields a Candidate when one is found, None after each expansion.

        Budgets count this searcher's own work (expansions, and seconds spent
        inside this generator), so several searchers can be interleaved.
        """
        busy = 0.0
        resumed = time.perf_counter()
        root = _State(tuple(sorted(self.input_terms)), 0.0, 0, None, None, frozenset(self.input_terms),
                      tuple(0 for _ in self.fn_names), ("<s>", "<s>"), 0)
        counter = itertools.count()
        h0 = self._heuristic(root)
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
            if since_expansions >= self.max_expansions:
                self.stats.stopped = "expansions"
                break
            if busy + (now - resumed) - since_busy >= self.max_seconds:
                self.stats.stopped = "seconds"
                break
            f, h, _, state = heapq.heappop(open_heap)
            if best_g.get(state.live, INF) < state.g:
                continue
            if self._is_goal(state):
                for assignment in self._assignments(state):
                    text, n_lines = self._emit(state, assignment)
                    if text in seen_texts:
                        continue
                    seen_texts.add(text)
                    if not self._check(text):
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
                ch = self._heuristic(child)
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


_PREFIX = {
    "Bufferize": "buf", "Streamify": "st", "Promote": "prom", "Repeat": "rep", "RepeatRef": "rep",
    "Flatten": "flat", "Reshape": "tiles", "Zip": "zip", "Map": "y", "Accum": "acc", "Scan": "scan",
}


def _render_size_param(width, binding: Mapping[str, int]) -> str:
    dim = width if isinstance(width, Dim) else Dim.sym(str(width))
    if dim.is_const:
        return str(int(dim.coeff))
    if len(dim.powers) == 1 and dim.powers[0][1] == 1 and dim.coeff == 1:
        return f"{dim.powers[0][0]}_value"
    return str(dim.evaluate(binding))


# ---------------------------------------------------------------------------
# the glue distance (a heuristic; typing is always the simulator's)


def _width(elem: MultihotType, binding: Mapping[str, int]) -> Optional[int]:
    w = elem.width if isinstance(elem.width, Dim) else Dim.sym(str(elem.width))
    try:
        return w.evaluate(binding)
    except ValueError:
        return None


def _chunk_span(part: tuple, whole: tuple) -> Optional[tuple[int, int]]:
    """(i, j) if `part` equals `whole[i:j]` (first match), else None."""
    n = len(part)
    for i in range(len(whole) - n + 1):
        if whole[i:i + n] == part:
            return i, i + n
    return None


def _common_supersequences(a: tuple, b: tuple, limit: int = 4) -> list[tuple]:
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


def _decompose(st: StreamType):
    """(leaf type, full dims = buffer dims + stream dims, boundary p = number of buffer dims)."""
    elem = st.elem
    if isinstance(elem, BufferType):
        return elem.inner, tuple(elem.dims) + tuple(st.shape), len(elem.dims)
    return elem, tuple(st.shape), 0


class _DimTable:
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


def _align(full: tuple, p0: int, goal: tuple, dims: _DimTable):
    """DP: best[i][j] = (cost, events, pG): cover goal[:j] with full[:i] by runs and insertions.

    A run of one dim costs 0, a longer run whose product is the goal dim costs
    one Flatten; a goal dim not covered is inserted (Promote for 1, Repeat for a
    usable size, impossible otherwise). `pG` is where the source's buffer
    boundary lands in goal coordinates (x.5 when a run crosses it). Dims are
    `_DimTable` ids.
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


def _full_distance(full: tuple, p0: int, t_full: tuple, p_t: int, dims: _DimTable,
                   tuple_mode: bool = False) -> float:
    best = _align(full, p0, t_full, dims)
    cell = best[len(full)][len(t_full)]
    if cell is None:
        return INF
    cost, events, pg = cell
    if pg is None:
        pg = len(t_full)
    return cost + _boundary_cost(pg, events, p_t, tuple_mode)


def _prefix_distance(full: tuple, p0: int, bdims: tuple, min_sd: int, dims: _DimTable) -> float:
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


# ---------------------------------------------------------------------------
# public functions


def search_programs(task: SearchTask | str, *, demonstrations: Sequence[Demonstration | tuple[str, Optional[str]] | str] = (),
                    n: int = 1, temperature: float = 0.0, seed: int = 0,
                    config: SearchConfig | Mapping[str, Any] | None = None,
                    prior: Optional[OpPrior] = None, stats: Optional[SearchStats] = None) -> Iterator[Candidate]:
    """Yield up to `n` distinct well-typed candidate programs for `task` (a SearchTask or its IR text).

    `demonstrations` fit the prior (ignored when `prior` is given); `stats`,
    if given, is updated as the search goes.
    """
    cfg = _as_config(config)
    spec = task if isinstance(task, SearchTask) else SearchTask.from_ir(task)
    if n <= 0:
        return
    if prior is None:
        prior = fit_prior(demonstrations, cfg, task if isinstance(task, str) else None)
    stats = stats if stats is not None else SearchStats()
    priors = [(prior, 1.0)]
    if prior.n_programs and cfg.base_share > 0:
        priors = [(prior, 1.0 - cfg.base_share), (OpPrior(mix=cfg.mix), cfg.base_share)]
    weights = cfg.heuristic_weights
    members: list[tuple[_Searcher, float]] = []
    for k, (p, p_share) in enumerate(priors):
        # the learned prior runs at every weight; the base prior (a safeguard) in the prior's own order only
        ws = weights if k == 0 else weights[:1]
        for w in ws:
            share = p_share / len(ws)
            first = members[0][0] if members else None
            members.append((_Searcher(spec, p, cfg, n=n, temperature=temperature, seed=seed, weight=w,
                                      share_with=first), share))
    if len(members) == 1:
        members[0][0].stats = stats
        yield from members[0][0].run()
        return
    yield from _portfolio(members, n, stats)


def _portfolio(members: list[tuple["_Searcher", float]], n: int, stats: SearchStats) -> Iterator[Candidate]:
    """Several searches of one task: candidates in proportion to their shares, expansions interleaved.

    The next candidate is owed by the member furthest below its share of the
    candidates given so far. Members take turns of `_SLICE * share`
    expansions: the owing member always, the others while they have no
    candidate waiting. The owing member's candidate is given as soon as it
    has one; if it has gone `_PATIENCE` expansions without one while another
    member has a candidate waiting, that one is given instead (so a member
    that is stuck does not hold back what the others found). Duplicates are
    dropped. Each member stops on its own per-sample budget; the portfolio
    stops at `n` programs or when every member stopped.
    """
    start = time.perf_counter()
    total = sum(w for _, w in members if w > 0)
    runs = [_Member(s, s.steps(), w / total) for s, w in members if w > 0]
    seen: set[str] = set()

    def sync(stopped: str = "") -> None:
        stats.expansions = sum(r.searcher.stats.expansions for r in runs)
        stats.generated = sum(r.searcher.stats.generated for r in runs)
        stats.rejected = sum(r.searcher.stats.rejected for r in runs)
        stats.seconds = time.perf_counter() - start
        if stopped:
            stats.stopped = stopped

    def give(member: "_Member") -> Optional[Candidate]:
        while member.queue:
            item = member.queue.pop(0)
            if item.text in seen:
                continue
            seen.add(item.text)
            member.given += 1
            stats.candidates += 1
            sync()
            return Candidate(item.text, item.cost, stats.expansions, stats.seconds, item.statements)
        return None

    while stats.candidates < n:
        live = [r for r in runs if r.alive or r.queue]
        if not live:
            break
        owing = min(live, key=lambda r: ((r.given + 1) / r.share, runs.index(r)))
        cand = give(owing)
        if cand is not None:
            yield cand
            continue
        if not owing.alive:
            continue
        if owing.waiting >= _PATIENCE:
            others = sorted((r for r in runs if r is not owing and r.queue), key=lambda r: (r.given + 1) / r.share)
            cand = next((c for c in (give(r) for r in others) if c is not None), None)
            if cand is not None:
                yield cand
                continue
        for r in runs:
            if r.alive and (r is owing or not r.queue):
                r.turn(max(1, round(_SLICE * r.share)))
    reasons = sorted({r.searcher.stats.stopped for r in runs if r.searcher.stats.stopped})
    sync("n" if stats.candidates >= n else "/".join(reasons) or "exhausted")


class _Member:
    """One search in a portfolio: its generator, share, waiting candidates."""

    def __init__(self, searcher: "_Searcher", steps: Iterator[Optional[Candidate]], share: float):
        self.searcher = searcher
        self.steps = steps
        self.share = share
        self.queue: list[Candidate] = []
        self.given = 0
        self.alive = True
        self.waiting = 0  # expansions since this member last found a candidate

    def turn(self, expansions: int) -> None:
        """Run up to `expansions` expansions, stopping early at a candidate."""
        while expansions > 0:
            item = next(self.steps, _DONE)
            if item is _DONE:
                self.alive = False
                return
            if item is None:
                expansions -= 1
                self.waiting += 1
                continue
            self.queue.append(item)
            self.waiting = 0
            return


_SLICE = 64  # expansions per portfolio turn, split among the members by share
_PATIENCE = 400  # expansions the owing member may take before a waiting candidate of another member is given
_DONE = object()


def fit_prior(demonstrations: Sequence[Demonstration | tuple[str, Optional[str]] | str],
              config: SearchConfig | Mapping[str, Any] | None = None, target_ir: Optional[str] = None) -> OpPrior:
    """The base prior with the demonstrations' programs counted in (at most `max_demonstrations`).

    With `target_ir`, demonstrations of tasks that look like the target count
    more (`OpPrior.fit`).
    """
    cfg = _as_config(config)
    pairs = []
    for d in list(demonstrations)[: cfg.max_demonstrations]:
        if isinstance(d, Demonstration):
            pairs.append((d.impl, d.task_ir))
        elif isinstance(d, str):
            pairs.append((d, None))
        else:
            pairs.append((d[0], d[1]))
    return OpPrior(mix=cfg.mix).fit(pairs, target_ir=target_ir, floor=cfg.similarity_floor)


def _as_config(config) -> SearchConfig:
    if config is None:
        return SearchConfig()
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, Mapping):
        return SearchConfig(**dict(config))
    options = getattr(config, "options", None)  # the loop's ProposerConfig carries search settings in `options`
    if isinstance(options, Mapping):
        return SearchConfig(**dict(options))
    raise TypeError(f"expected a SearchConfig, a mapping of its keys or None, got {type(config).__name__}")


class SearchProposer(Proposer):
    """The model-free proposer: type-directed best-first search (see the module docstring).

    `SearchProposer(config)` takes a `SearchConfig`, a mapping of its keys,
    an object with such a mapping as `.options` (the loop's proposer config),
    or None for the defaults. Construction is cheap and the object pickles
    (its caches are dropped). `propose` returns, per request, up to `n`
    distinct programs in search order; `Proposal.raw` is the program text,
    token counts are 0, `seconds` is the search time spent on that proposal
    (since the previous one; the last one also carries the search after it).
    `last_stats` holds each request's `SearchStats` of the latest call.
    """

    name = "search"

    def __init__(self, config: SearchConfig | Mapping[str, Any] | None = None, **overrides: Any):
        cfg = _as_config(config)
        if overrides:
            cfg = cfg.model_copy(update=SearchConfig(**{**cfg.model_dump(), **overrides}).model_dump())
        self.config = cfg
        self._priors: dict[str, OpPrior] = {}
        self._tasks: dict[str, SearchTask] = {}
        self.last_stats: list[SearchStats] = []

    def __getstate__(self):
        return {"config": self.config.model_dump(), "_priors": {}, "_tasks": {}, "last_stats": []}

    def __setstate__(self, state):
        self.config = SearchConfig(**state["config"])
        self._priors = {}
        self._tasks = {}
        self.last_stats = []

    def _prior(self, demonstrations: Sequence[Demonstration], target_ir: str) -> OpPrior:
        digest = hashlib.sha256("\x00".join([target_ir] + [f"{d.impl}\x01{d.task_ir}" for d in demonstrations])
                                .encode()).hexdigest()
        prior = self._priors.get(digest)
        if prior is None:
            prior = fit_prior(demonstrations, self.config, target_ir)
            if len(self._priors) > 16:
                self._priors.clear()
            self._priors[digest] = prior
        return prior

    def _task(self, task_ir: str) -> SearchTask:
        key = hashlib.sha256(task_ir.encode()).hexdigest()
        task = self._tasks.get(key)
        if task is None:
            task = SearchTask.from_ir(task_ir)
            if len(self._tasks) > 64:
                self._tasks.clear()
            self._tasks[key] = task
        return task

    def iter_candidates(self, request: ProposalRequest, stats: Optional[SearchStats] = None) -> Iterator[Candidate]:
        """The candidates of one request, lazily (for callers that verify as they go)."""
        prior = self._prior(request.demonstrations, request.task_ir)
        return search_programs(self._task(request.task_ir), n=request.n, temperature=request.temperature,
                               seed=request.seed, config=self.config, prior=prior, stats=stats)

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        results: list[list[Proposal]] = []
        self.last_stats = []
        for request in requests:
            stats = SearchStats()
            proposals: list[Proposal] = []
            last = 0.0
            for cand in self.iter_candidates(request, stats):
                proposals.append(Proposal(raw=cand.text, messages=None, prompt_tokens=0, completion_tokens=0,
                                          seconds=round(cand.seconds - last, 6)))
                last = cand.seconds
            if proposals and stats.seconds > last:  # the search after the last program counts too
                tail = proposals[-1]
                proposals[-1] = tail.model_copy(update={"seconds": round(tail.seconds + stats.seconds - last, 6)})
            self.last_stats.append(stats)
            results.append(proposals)
        return results


__all__ = [
    "Candidate",
    "SearchConfig",
    "SearchProposer",
    "SearchStats",
    "SearchTask",
    "SearchTaskError",
    "fit_prior",
    "search_programs",
]
