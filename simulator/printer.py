"""The program printer: the parsed IR (simulator/program.py) back to STeP text, one statement per line.

`parse_program(format_program(p))` gives back the same IR; comments and
layout are not kept.
"""

from __future__ import annotations

from typing import Sequence, Union

from stepforge.simulator.program import Apply, Comprehension, FnList, OpCall, Program, Return


def format_call(call: OpCall) -> str:
    """`step.Op(args)` of one operator call."""
    return f"step.{call.label()}"


def format_arg(arg) -> str:
    """An apply argument: a name, or a tuple of names (nested)."""
    if isinstance(arg, str):
        return arg
    if len(arg) == 1:
        return "(" + format_arg(arg[0]) + ",)"
    return "(" + ", ".join(format_arg(a) for a in arg) + ")"


def format_statement(st) -> str:
    """One statement of the IR as program text (one line); `parse_program` reads it back to the same IR."""
    if isinstance(st, Apply):
        if st.unpack:
            lhs = ", ".join(st.targets) + ("," if len(st.targets) == 1 else "")
        else:
            lhs = st.targets[0]
        return f"{lhs} = {format_call(st.call)}.apply({format_arg(st.arg)})"
    if isinstance(st, FnList):
        return f"{st.target} = [" + ", ".join(st.fns) + "]"
    if isinstance(st, Comprehension):
        its = ["[" + ", ".join(it) + "]" if isinstance(it, tuple) else it for it in st.iterables]
        source = its[0] if len(its) == 1 else "zip(" + ", ".join(its) + ")"
        return (f"{st.target} = [{format_call(st.call)}.apply({format_arg(st.arg)}) "
                f"for {', '.join(st.loop_vars)} in {source}]")
    if isinstance(st, Return):
        return "return " + ", ".join(st.names)
    raise TypeError(f"not a statement: {st!r}")


def format_program(program: Union[Program, Sequence]) -> str:
    """The program as text, one statement per line (comments and layout are not kept)."""
    statements = program.statements if isinstance(program, Program) else program
    return "".join(format_statement(st) + "\n" for st in statements)
