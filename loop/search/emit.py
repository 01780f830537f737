"""From a goal state to program text: the output assignments, the emitted program and its final check."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from typing import TYPE_CHECKING, Mapping

from stepforge.loop.search.task import SearchTask
from stepforge.simulator.errors import SimulatorError
from stepforge.simulator.interpreter import typecheck_program
from stepforge.simulator.program import check_affine, format_kwargs, parse_program
from stepforge.simulator.shapes import Dim

if TYPE_CHECKING:
    from stepforge.loop.search.searcher import State
    from stepforge.loop.search.tables import TaskTables


def is_goal(tables: TaskTables, state: State) -> bool:
    """Whether every fn was applied and the live streams are exactly the outputs' types."""
    if not all(state.used):
        return False
    if len(state.live) != len(tables.output_types):
        return False
    return Counter(tables.term_type[t] for t in state.live) == tables.output_counter


def assignments(tables: TaskTables, state: State) -> list[tuple[int, ...]]:
    """Distinct ways to give each output a live term of its type (latest-made first for equal types)."""
    pools: list[list[int]] = []
    for tid in tables.output_types:
        pools.append(sorted((t for t in set(state.live) if tables.term_type[t] == tid), reverse=True))
    result = []
    seen = set()
    for combo in itertools.product(*pools):
        if Counter(combo) != Counter(t for t in state.live):
            continue
        if combo not in seen:
            seen.add(combo)
            result.append(combo)
    return result


def emit(tables: TaskTables, state: State, assignment: tuple[int, ...]) -> tuple[str, int]:
    """The program text of the moves that led to goal `state`, returning `assignment`; and its line count.

    A borrowed input becomes `a, b = step.Copy().apply(x)`; a route becomes
    Copy, Partition, a fn list, a per-route Map comprehension and a Merge.
    Returned streams are named after the outputs where that is unambiguous.
    """
    moves = []
    s = state
    while s.parent is not None:
        moves.append(s.move)
        s = s.parent
    moves.reverse()
    reserved = set(tables.fn_names) | {n for n, _ in tables.task.inputs} | set(tables.task.binding) \
        | {f"{k}_value" for k in tables.task.binding} | {"step", "zip"}
    counters: Counter = Counter()
    names_used = set(reserved)

    def fresh(prefix: str) -> str:
        while True:
            counters[prefix] += 1
            name = f"{prefix}{counters[prefix]}"
            if name not in names_used:
                names_used.add(name)
                return name

    names: dict[int, list[str]] = {t: [n] for t, (n, _) in zip(tables.input_terms, tables.task.inputs)}
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
            width = tables.types[tables.term_type[mv.inputs[1][0]]].elem.width
            n_param = _render_size_param(width, tables.task.binding)
            lines.append(f"{parts} = step.Partition(N={n_param}).apply(({data}, {i0}))")
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
    for var, (out_name, _) in zip(returned, tables.task.outputs):
        if var in single_defs and out_name not in names_used and returned.count(var) == 1:
            text = re.sub(rf"\b{re.escape(var)}\b", out_name, text)
            names_used.add(out_name)
    return text, len(lines)


def check(task: SearchTask, text: str) -> bool:
    """The final static check: parses, type-checks against the task, is affine, has the declared output types."""
    try:
        program = parse_program(text)
        typed = typecheck_program(program, dict(task.inputs), task.fns, task.binding)
    except SimulatorError:
        return False
    if check_affine(program):
        return False
    return list(typed.outputs) == [st for _, st in task.outputs]


_PREFIX = {
    "Bufferize": "buf", "Streamify": "st", "Promote": "prom", "Repeat": "rep", "RepeatRef": "rep",
    "Flatten": "flat", "Reshape": "tiles", "Zip": "zip", "Map": "y", "Accum": "acc", "Scan": "scan",
}


def _render_size_param(width, binding: Mapping[str, int]) -> str:
    """A Partition width as program text: an int, `X_value` for a plain symbol, else its value."""
    dim = width if isinstance(width, Dim) else Dim.sym(str(width))
    if dim.is_const:
        return str(int(dim.coeff))
    if len(dim.powers) == 1 and dim.powers[0][1] == 1 and dim.coeff == 1:
        return f"{dim.powers[0][0]}_value"
    return str(dim.evaluate(binding))
