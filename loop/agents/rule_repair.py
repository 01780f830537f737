"""The rule-based affine repair: insert the Copies a program needs, change nothing else.

On the parsed program it finds every stream consumed k > 1 times and inserts exactly
k-1 `Copy`s for it, chained, right after the statement that defines it (at
the top for an input), then renames each later use to its own copy. Every
other line is left byte for byte as it was (comments included); a program
that already obeys the rule, or does not parse, is returned unchanged. The
copies carry the same data, so the program's meaning never changes.

What it cannot repair (the language has no form for it) is left as it is and
listed in `RepairResult.unfixable`: a list of streams (a Partition or
comprehension result) consumed twice, and a stream from outside a list
comprehension used in its body (consumed once per item). Such a program
still fails the affine check in the verifier.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from stepforge.simulator import ProgramSyntaxError, check_affine, parse_program
from stepforge.simulator.printer import format_program
from stepforge.simulator.program import Apply, Comprehension, FnList, Program, Return


@dataclass
class RepairResult:
    program: str
    changed: bool
    copies: int = 0  # Copy statements inserted
    unfixable: list[str] = field(default_factory=list)  # violations left as they were


@dataclass
class _Version:
    """One stream (a name between two assignments) and where it is consumed."""

    name: str
    kind: str  # stream | list | fns
    after_line: int  # insert Copies after this line (0: at the top)
    uses: list = field(default_factory=list)  # ast.Name nodes, in program order
    in_body: bool = False  # used inside a comprehension body


def _arg_nodes(node: ast.AST) -> list[ast.Name]:
    if isinstance(node, ast.Name):
        return [node]
    if isinstance(node, ast.Tuple):
        return [n for e in node.elts for n in _arg_nodes(e)]
    return []


_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


def _split_lines(text: str) -> list[list[str]]:
    """`[[content, line_ending], ...]` with Python's line breaks; the last line may have no ending."""
    parts = _LINE_BREAK.split(text)
    lines = [[parts[i], parts[i + 1] if i + 1 < len(parts) else ""] for i in range(0, len(parts), 2)]
    if lines and lines[-1] == ["", ""]:
        lines.pop()
    return lines


def _one_statement_per_line(tree: ast.Module) -> bool:
    last_end = 0
    for node in tree.body:
        if node.lineno <= last_end:
            return False
        last_end = node.end_lineno or node.lineno
    return True


def repair_affine(text: str) -> RepairResult:
    """Insert the Copies the affine rule needs (see the module docstring)."""
    try:
        program = parse_program(text)
    except ProgramSyntaxError:
        return RepairResult(text, False)
    if not check_affine(program):
        return RepairResult(text, False)
    tree = ast.parse(text)
    source = text
    if not _one_statement_per_line(tree):  # `a = ...; b = ...`: lay it out one statement per line first
        source = format_program(program)
        tree = ast.parse(source)
    result = _repair(source, tree, program)
    try:
        repaired = parse_program(result.program)
    except ProgramSyntaxError:  # cannot happen for a parsed program; never hand back a broken one
        return RepairResult(text, False, unfixable=result.unfixable)
    if len(check_affine(repaired)) >= len(check_affine(program)):
        return RepairResult(text, False, unfixable=result.unfixable)
    return result


def _repair(text: str, tree: ast.Module, program: Program) -> RepairResult:
    taken = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    taken |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    current: dict[str, _Version] = {}
    versions: list[_Version] = []

    def version_of(name: str) -> _Version:
        if name not in current:  # an input (or an undefined name the type check will report)
            v = _Version(name, "stream", 0)
            current[name] = v
            versions.append(v)
        return current[name]

    def define(name: str, kind: str, line: int) -> None:
        v = _Version(name, kind, line)
        current[name] = v
        versions.append(v)

    for node, st in zip(tree.body, program.statements):
        end = node.end_lineno or node.lineno
        if isinstance(st, Apply):
            for n in _arg_nodes(node.value.args[0]):
                version_of(n.id).uses.append(n)
            kind = "list" if st.call.op == "Partition" and not st.unpack else "stream"
            for t in st.targets:
                define(t, kind, end)
        elif isinstance(st, FnList):
            define(st.target, "fns", end)
        elif isinstance(st, Comprehension):
            comp = node.value
            gen = comp.generators[0]
            iterables = gen.iter.args if isinstance(gen.iter, ast.Call) else [gen.iter]
            for it in iterables:
                if isinstance(it, ast.Name):
                    version_of(it.id).uses.append(it)
            loop_vars = set(st.loop_vars)
            for n in _arg_nodes(comp.elt.args[0]):
                if n.id not in loop_vars:
                    v = version_of(n.id)
                    v.uses.append(n)
                    v.in_body = True
            define(st.target, "list", end)
        elif isinstance(st, Return):
            value = node.value
            for n in value.elts if isinstance(value, ast.Tuple) else [value]:
                version_of(n.id).uses.append(n)

    inserts: dict[int, list[str]] = {}
    renames: dict[int, list[tuple[int, int, str]]] = {}  # line -> (start byte, end byte, new name)
    unfixable: list[str] = []
    copies = 0
    for v in versions:
        if v.kind == "fns" or len(v.uses) < 2:
            if v.in_body and v.kind != "fns":
                unfixable.append(f"{v.name} is used inside a list comprehension (once per item)")
            continue
        if v.kind == "list":
            unfixable.append(f"{v.name} is a list of streams consumed {len(v.uses)} times (a list cannot be copied)")
            continue
        if v.in_body:
            unfixable.append(f"{v.name} is used inside a list comprehension (once per item)")
        names, lines = _copy_plan(v.name, len(v.uses), taken)
        inserts.setdefault(v.after_line, []).extend(lines)
        copies += len(lines)
        for use, new in zip(v.uses, names):
            renames.setdefault(use.lineno, []).append((use.col_offset, use.end_col_offset, new))

    lines = _split_lines(text)
    default_end = next((end for _, end in lines if end), "\n")
    for lineno, edits in renames.items():
        content = lines[lineno - 1][0].encode("utf-8")
        for start, stop, new in sorted(edits, reverse=True):
            content = content[:start] + new.encode("utf-8") + content[stop:]
        lines[lineno - 1][0] = content.decode("utf-8")
    out: list[str] = []
    for line in inserts.get(0, []):
        out.append(line + default_end)
    for i, (content, end) in enumerate(lines, 1):
        added = inserts.get(i, [])
        out.append(content + (end or (default_end if added else "")))
        for line in added:
            out.append(line + (end or default_end))
    return RepairResult("".join(out), bool(inserts), copies, unfixable)


def _copy_plan(name: str, uses: int, taken: set[str]) -> tuple[list[str], list[str]]:
    """Names for `uses` copies of `name` and the chained Copy lines that make them."""
    prefix = name
    while True:
        copies = [f"{prefix}_{i}" for i in range(uses)]
        temps = [f"{prefix}_t" if i == 0 else f"{prefix}_t{i + 1}" for i in range(uses - 2)]
        if not (set(copies) | set(temps)) & taken:
            break
        prefix += "_c"
    taken.update(copies, temps)
    lines = []
    source = name
    for i, temp in enumerate(temps):
        lines.append(f"{copies[i]}, {temp} = step.Copy().apply({source})")
        source = temp
    lines.append(f"{copies[uses - 2]}, {copies[uses - 1]} = step.Copy().apply({source})")
    return copies, lines


# ---------------------------------------------------------------------------
# guardians
