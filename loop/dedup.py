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

Open-mode candidates (fns + impl, `loop/candidates.py`) have a key of both
parts: the program's key with the candidate's fns renamed `f0, f1, ...` in
order of first use, then each fn's types, init and body, the body with the
names it assigns renamed `t0, t1, ...` in order of assignment and written
back in one layout (`ast` parses it: parsing only, nothing runs; a final
expression becomes a `return`). The fn's display `name` is not part of it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Optional, Sequence

from stepforge.loop.candidates import is_candidate, parse_candidate
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
    form = canonical_candidate(program_text) if is_candidate(program_text) else canonical_form(program_text)
    return form if form is not None else "\0unparsed\0" + program_text.strip()


# ---------------------------------------------------------------------------
# open-mode candidates


def canonical_fn_body(apply: str) -> str:
    """A fn body with its assigned names renamed in order (`t0, t1, ...`), in one layout; the text if unparsable."""
    try:
        tree = ast.parse(apply)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return apply.strip()
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tree.body[-1] = ast.Return(tree.body[-1].value)
    # ast.walk is breadth-first: the stores are numbered in source order
    stores = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)),
                    key=lambda n: (n.lineno, n.col_offset))
    names: dict[str, str] = {}
    for node in stores:
        names.setdefault(node.id, f"t{len(names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            node.id = names[node.id]
    try:
        return ast.unparse(tree)
    except (RecursionError, ValueError):
        return apply.strip()


def _rename_fns(statements: list, rename: dict[str, str]) -> list:
    def kw(value):
        if isinstance(value, NameRef):
            return NameRef(rename.get(value.name, value.name))
        if isinstance(value, tuple):
            return tuple(kw(v) for v in value)
        return value

    out = []
    for st in statements:
        if isinstance(st, FnList):
            st = dataclasses.replace(st, fns=tuple(rename.get(f, f) for f in st.fns))
        elif isinstance(st, (Apply, Comprehension)):
            st = dataclasses.replace(st, call=dataclasses.replace(
                st.call, kwargs=tuple((k, kw(v)) for k, v in st.call.kwargs)))
        out.append(st)
    return out


def _fn_uses(statements: list, fn_names: set[str]) -> list[str]:
    """Fn names in order of first use in the (canonical) statements."""
    seen: list[str] = []

    def kw(value):
        if isinstance(value, NameRef) and value.name in fn_names and value.name not in seen:
            seen.append(value.name)
        elif isinstance(value, tuple):
            for v in value:
                kw(v)

    for st in statements:
        if isinstance(st, FnList):
            for f in st.fns:
                kw(NameRef(f))
        elif isinstance(st, (Apply, Comprehension)):
            for _, v in st.call.kwargs:
                kw(v)
    return seen


def canonical_candidate(text: str) -> Optional[str]:
    """A key equal for open candidates that differ only in names (variables, fns, fn locals), order of
    the fns, comments and layout; None if it is not a candidate or its program does not parse."""
    cand = parse_candidate(text)
    if cand is None:
        return None
    try:
        statements = canonical_program(parse_program(cand.impl))
    except ProgramSyntaxError:
        return None
    names = {f.func_name for f in cand.fns}
    used = _fn_uses(statements, names)
    fprefix = _prefix("f", _external_names(parse_program(cand.impl)) - names)
    rename = {n: f"{fprefix}{i}" for i, n in enumerate(used)}
    fns = {f.func_name: f for f in cand.fns}
    lines = [format_program(_rename_fns(statements, rename)).rstrip("\n")]
    parts = []
    for n in used + sorted(names - set(used), key=lambda n: canonical_fn_body(fns[n].apply)):
        f = fns[n]
        parts.append(f"fn {rename.get(n, '?')}: {f.input_dtype!r} -> {f.output_dtype!r} init {f.init_list()!r}\n"
                     + canonical_fn_body(f.apply))
    return "\n".join(lines + parts) + "\n"


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
    its non-blank, non-comment lines, stripped. An open candidate counts its fns' body lines as
    statements and their characters too."""
    cand = parse_candidate(program_text)
    if cand is not None:
        statements, chars = program_size(cand.impl)
        for f in cand.fns:
            body = [ln.strip() for ln in f.apply.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            statements, chars = statements + len(body), chars + sum(len(ln) for ln in body)
        return statements, chars
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


__all__ = ["canonical_candidate", "canonical_fn_body", "canonical_form", "canonical_program", "dedup", "program_size", "select_shortest"]
