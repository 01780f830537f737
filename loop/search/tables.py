"""The typing tables of one task, computed once and shared by every search of a portfolio.

`TaskTables` interns stream types and terms (a term is one stream a program
can make: an input, or an operator applied to terms), classifies the task's
fns (plain maps, folds, expert groups for routing), types every candidate
move by the simulator's own rules (`stepforge.simulator.ops.resolve_params` /
`infer`) and caches, per type, the moves that apply to it. Its `targets`
(`TargetTables`, loop/search/targets.py) holds the glue distances and the
heuristic. All searches of one request hold the same `TaskTables` object, so
every cache is shared.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from stepforge.loop.search.config import SearchConfig
from stepforge.loop.search.distance import DimTable, chunk_span, multihot_width
from stepforge.loop.search.targets import TargetTables
from stepforge.loop.search.task import SearchTask, fields_of
from stepforge.simulator.errors import StepTypeError
from stepforge.simulator.ops import StreamList, TypeContext, infer, resolve_params
from stepforge.simulator.program import NameRef, OpCall, SizeExpr
from stepforge.simulator.shapes import Dim
from stepforge.simulator.types import BufferType, MultihotType, TupleType
from stepforge.simulator.values import StreamType

GLUE_OPS = ("Bufferize", "Streamify", "Promote", "Repeat", "Flatten", "Reshape", "RepeatRef")


class TaskTables:
    """Interned types and terms, fn classes and typed move options of one task (see the module docstring)."""

    def __init__(self, task: SearchTask, config: SearchConfig):
        self.task = task
        self.config = config
        self.ctx = TypeContext(fns=task.fns, binding=dict(task.binding))
        self.dims = DimTable(task.sizes)
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
            self.input_terms.append(self.intern_term(("input", name), "input", self.intern_type(st), -1))
        self.output_types = [self.intern_type(st) for _, st in task.outputs]
        self.output_counter = Counter(self.output_types)
        # caches
        self._infer_cache: dict[tuple, Any] = {}
        self._glue_cache: dict[int, list] = {}
        self._fn_cache: dict[int, list] = {}
        self._pair_cache: dict[tuple[int, int], list] = {}
        self._classify_fns()
        self.targets = TargetTables(self)

    # -- interning --------------------------------------------------------------
    def intern_type(self, st: StreamType) -> int:
        """The id of a stream type (equal types, equal ids)."""
        tid = self.type_ids.get(st)
        if tid is None:
            tid = len(self.types)
            self.types.append(st)
            self.type_ids[st] = tid
        return tid

    def intern_term(self, key: tuple, op: str, type_id: int, parent: int) -> int:
        """The id of the term `key` = (op, kwargs, input terms); made with this type and parent if new."""
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
        for (_ins, outs), names in groups.items():
            if len(names) >= 2 and len(names) in widths:
                merges = [m for m in self.fold_fns if fields_of(fns[m].input_type) == outs]
                if merges:
                    self.expert_groups.append(tuple(names))
        self.expert_fns = {n for g in self.expert_groups for n in g}
        self.map_fns = [n for n in plain if n not in self.expert_fns]
        self.fn_fields = {n: fields_of(f.input_type) for n, f in fns.items()}

    # -- typing (the simulator's rules) ------------------------------------------
    def infer_type(self, op: str, kwargs: tuple, arg_types: Any):
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
            result = tuple(self.intern_type(o) for o in out) if isinstance(out, list) else self.intern_type(out)
        self._infer_cache[key] = result
        return result

    def route_type(self, data: int, idx: int, group: tuple[str, ...], merge: str) -> Optional[int]:
        """The Merge output of Partition -> per-route Map -> Merge, typed op by op, or None."""
        key = ("route", data, idx, group, merge)
        if key in self._infer_cache:
            return self._infer_cache[key]
        result = None
        try:
            width = self.types[idx].elem.width
            n_kw = self.size_kw(width)
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
                result = self.intern_type(out)
        except (StepTypeError, AttributeError):
            result = None
        self._infer_cache[key] = result
        return result

    def size_kw(self, dim) -> Any:
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

    # -- moves -------------------------------------------------------------------------
    def glue_options(self, type_id: int) -> list[tuple[str, tuple, int]]:
        """(op, kwargs, output type) of every glue op that types on this stream type and changes it."""
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
        options += [("Repeat", (("n", self.size_kw(d)),)) for d in self.task.sizes]
        for i in range(1, rank + 1):
            for j in range(i, rank + 1):
                options.append(("Flatten", (("L", tuple(range(i, j + 1))),)))
        if self.config.allow_reshape:
            for i in range(0, rank + 1):
                for d in self.task.sizes:
                    options.append(("Reshape", (("L", (i,)), ("S", self.size_kw(d)))))
        result = []
        for op, kwargs in options:
            out = self.infer_type(op, kwargs, type_id)
            if out is not None and out != type_id:
                result.append((op, kwargs, out))
        self._glue_cache[type_id] = result
        return result

    def fn_options(self, type_id: int) -> list[tuple[str, tuple, int, str]]:
        """(op, kwargs, output type, fn) of every Map / Accum / Scan of a task fn on this stream type."""
        cached = self._fn_cache.get(type_id)
        if cached is not None:
            return cached
        st = self.types[type_id]
        fields = fields_of(st.elem)
        result = []
        for name in self.map_fns:
            if self.fn_fields[name] == fields:
                kwargs = (("fn", NameRef(name)),)
                out = self.infer_type("Map", kwargs, type_id)
                if out is not None:
                    result.append(("Map", kwargs, out, name))
        for name in self.fold_fns:
            if self.fn_fields[name] != fields:
                continue
            for op in ("Accum", "Scan"):
                for k in range(1, st.rank + 1):
                    kwargs = (("fn", NameRef(name)), ("b", k))
                    out = self.infer_type(op, kwargs, type_id)
                    if out is not None:
                        result.append((op, kwargs, out, name))
        self._fn_cache[type_id] = result
        return result

    def pair_options(self, t1: int, t2: int) -> list[tuple]:
        """(op, extra, output type) of the two-stream moves: a Zip feeding a fn, RepeatRef, an expert route."""
        key = (t1, t2)
        cached = self._pair_cache.get(key)
        if cached is not None:
            return cached
        s1, s2 = self.types[t1], self.types[t2]
        result: list[tuple] = []
        zipped = fields_of(s1.elem) + fields_of(s2.elem)
        if s1.shape == s2.shape and any(chunk_span(zipped, f) for f in self.fn_fields.values()):
            out = self.infer_type("Zip", (), (t1, t2))
            if out is not None:
                result.append(("Zip", (), out))
        if s2.rank == s1.rank + 1 and s2.shape[1:] == s1.shape:
            out = self.infer_type("RepeatRef", (), (t1, t2))
            if out is not None:
                result.append(("RepeatRef", (), out))
        if isinstance(s2.elem, MultihotType):
            width = multihot_width(s2.elem, self.task.binding)
            for group in self.expert_groups:
                if len(group) != width or self.fn_fields[group[0]] != fields_of(s1.elem):
                    continue
                outs = fields_of(self.task.fns[group[0]].output_type)
                for merge in self.fold_fns:
                    if self.fn_fields[merge] != outs:
                        continue
                    out = self.route_type(t1, t2, group, merge)
                    if out is not None:
                        result.append(("route", (group, merge), out))
        self._pair_cache[key] = result
        return result

    def glue_ancestors(self, term: int) -> set[int]:
        """Types along the chain of single-input glue ops that made `term` (itself included)."""
        seen = {self.term_type[term]}
        while self.term_op[term] in GLUE_OPS and self.term_parent[term] >= 0:
            term = self.term_parent[term]
            seen.add(self.term_type[term])
        return seen

    def borrowable(self, term: int) -> bool:
        """Whether a move may borrow (Copy) this term instead of consuming it: anything but a Zip."""
        return self.term_op[term] != "Zip"
