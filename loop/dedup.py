"""Deduplication of correct programs (Algorithm 1's filter) and the choice of the shortest.

`canonical_form` maps a program to a key that ignores what does not change
its meaning as written: comments, blank lines, layout, `return (a, b)` versus
`return a, b`, keyword order inside one call, and the names of its own
variables. Streams, fn lists and comprehension results are renamed `v0, v1,
...` in order of definition (a re-assignment is a new stream, so it gets a
new name) and loop variables `l0, l1, ...` per comprehension; the two
results of a `Copy` are numbered in the order they are first used, so that
swapping which copy feeds which consumer is not a difference. Input names
(E0, ...), fn names and sizes stay as they are. A different operator,
keyword value, argument order or fn gives a different key. The key is itself
a program (one statement per line) that `parse_program` reads.

Statements are not reordered: two programs that list independent statements
in a different order keep different keys (a conservative choice: they are
never merged wrongly).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from stepforge.simulator import ProgramSyntaxError, parse_program
from stepforge.simulator.printer import format_program
from stepforge.simulator.program import Apply, Comprehension, FnList, NameRef, OpCall, Program, Return, SizeExpr


def _arg_names(arg) -> list[str]:
    if isinstance(arg, str):
        return [arg]
    return [n for a in arg for n in _arg_names(a)]


def _external_names(program: Program) -> set[str]:
    """Names the program uses but does not define (inputs, fns, sizes)."""
    names: set[str] = set()

    def kw(value):
        if isinstance(value, NameRef):
            names.add(value.name)
        elif isinstance(value, SizeExpr):
            for f in value.factors:
                kw(f)
        elif isinstance(value, tuple):
            for v in value:
                kw(v)

    for st in program.statements:
        if isinstance(st, (Apply, Comprehension)):
            names.update(_arg_names(st.arg))
            for _, v in st.call.kwargs:
                kw(v)
        if isinstance(st, FnList):
            names.update(st.fns)
        if isinstance(st, Comprehension):
            for it in st.iterables:
                names.update(it if isinstance(it, tuple) else (it,))
        if isinstance(st, Return):
            names.update(st.names)
    return names


def _prefix(base: str, external: set[str]) -> str:
    prefix = base
    while any(re.fullmatch(re.escape(prefix) + r"\d+", n) for n in external):
        prefix += "_"
    return prefix


def _first_uses(program: Program) -> dict[tuple[int, str], int]:
    """For each (defining statement, name): the position of its first use after it (or a large number)."""
    out: dict[tuple[int, str], int] = {}
    live: dict[str, tuple[int, str]] = {}
    position = 0
    for i, st in enumerate(program.statements):
        used: list[str] = []
        if isinstance(st, (Apply, Comprehension)):
            used = _arg_names(st.arg)
            if isinstance(st, Comprehension):
                used = [n for n in used if n not in st.loop_vars]
                used += [it for it in st.iterables if isinstance(it, str)]
        elif isinstance(st, Return):
            used = list(st.names)
        for n in used:
            position += 1
            key = live.get(n)
            if key is not None and key not in out:
                out[key] = position
        targets = st.targets if isinstance(st, Apply) else (st.target,) if isinstance(st, (FnList, Comprehension)) else ()
        for t in targets:
            live[t] = (i, t)
    return out


def canonical_program(program: Program) -> list:
    """The program's statements with its own variables renamed canonically (see the module docstring)."""
    external = _external_names(program)
    vprefix, lprefix = _prefix("v", external), _prefix("l", external)
    first_use = _first_uses(program)
    env: dict[str, str] = {}
    counter = 0
    out = []

    def fresh() -> str:
        nonlocal counter
        counter += 1
        return f"{vprefix}{counter - 1}"

    def arg(a, scope):
        if isinstance(a, str):
            return scope.get(a, a)
        return tuple(arg(x, scope) for x in a)

    def call(c: OpCall) -> OpCall:  # keyword values name fns and sizes, never streams: only their order goes
        return OpCall(c.op, tuple(sorted(c.kwargs, key=lambda kv: kv[0])), 0)

    for i, st in enumerate(program.statements):
        if isinstance(st, Apply):
            a = arg(st.arg, env)
            c = call(st.call)
            order = sorted(range(len(st.targets)), key=lambda j: (first_use.get((i, st.targets[j]), 1 << 30), j)) \
                if st.call.op == "Copy" else list(range(len(st.targets)))
            names = [fresh() for _ in st.targets]  # printed in this order: a Copy's results are interchangeable
            for j, n in zip(order, names):
                env[st.targets[j]] = n
            out.append(Apply(tuple(names), st.unpack, c, a, 0))
        elif isinstance(st, FnList):
            name = fresh()
            env[st.target] = name
            out.append(FnList(name, st.fns, 0))
        elif isinstance(st, Comprehension):
            iterables = tuple(it if isinstance(it, tuple) else env.get(it, it) for it in st.iterables)
            local = {v: f"{lprefix}{j}" for j, v in enumerate(st.loop_vars)}
            scope = {**env, **local}
            a = arg(st.arg, scope)
            c = OpCall(st.call.op, tuple(sorted(((k, _kw_local(v, local)) for k, v in st.call.kwargs),
                                                key=lambda kv: kv[0])), 0)
            name = fresh()
            env[st.target] = name
            out.append(Comprehension(name, c, a, tuple(local[v] for v in st.loop_vars), iterables, 0))
        elif isinstance(st, Return):
            out.append(Return(tuple(env.get(n, n) for n in st.names), 0))
    return out


def _kw_local(value, local: dict[str, str]):
    """Inside a comprehension only loop variables are renamed in keyword values (`fn=f`)."""
    if isinstance(value, NameRef) and value.name in local:
        return NameRef(local[value.name])
    if isinstance(value, tuple):
        return tuple(_kw_local(v, local) for v in value)
    return value


def canonical_form(program_text: str) -> Optional[str]:
    """A key equal for programs that differ only in variable names, comments and layout; None if it does not parse."""
    try:
        program = parse_program(program_text)
    except ProgramSyntaxError:
        return None
    return format_program(canonical_program(program))


def _key(program_text: str) -> str:
    form = canonical_form(program_text)
    return form if form is not None else "\0unparsed\0" + program_text.strip()


def dedup(programs: Sequence[str]) -> list[str]:
    """One representative (the first) of every canonical class, in input order.

    A program that does not parse is only a duplicate of the same text.
    """
    seen: dict[str, str] = {}
    for p in programs:
        seen.setdefault(_key(p), p)
    return list(seen.values())


def program_size(program_text: str) -> tuple[float, int]:
    """(statements, characters): parsed statements (inf if it does not parse) and the characters of
    its non-blank, non-comment lines, stripped."""
    lines = [ln.strip() for ln in program_text.splitlines()]
    chars = sum(len(ln) for ln in lines if ln and not ln.startswith("#"))
    try:
        statements: float = len(parse_program(program_text).statements)
    except ProgramSyntaxError:
        statements = float("inf")
    return statements, chars


def select_shortest(programs: Sequence[str]) -> Optional[str]:
    """The shortest program: fewest statements, then fewest characters, then the first; None if empty.

    The caller passes correct programs (verified); parse failures sort last.
    """
    if not programs:
        return None
    best = min(range(len(programs)), key=lambda i: (program_size(programs[i]), i))
    return programs[best]


__all__ = ["canonical_form", "canonical_program", "dedup", "program_size", "select_shortest"]
