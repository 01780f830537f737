"""Deduplication: renamings, comments and layout collapse; real changes do not."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepforge.benchmark.schema import load_benchmark
from stepforge.loop.agents.knowledge import load_knowledge
from stepforge.loop.dedup import canonical_form, dedup, program_size, select_shortest
from stepforge.simulator import parse_program

ROUTED = """route_0, route_1 = step.Copy().apply(E1)
parts = step.Partition(N=E_value).apply((E0, route_0))
experts = [fn_double, fn_add_one]
outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, experts)]
S0 = step.Merge(fn=fn_sum).apply((outs, route_1))
return S0
"""

ROUTED_RENAMED = """# route the tokens
r1, r0 = step.Copy().apply(E1)    # copies swapped, and used swapped
ps = step.Partition(N=E_value).apply( (E0, r0) )

fl = [fn_double, fn_add_one]
o = [step.Map(fn=g).apply(q) for q, g in zip(ps, fl)]
out = step.Merge(fn=fn_sum).apply((o, r1))
return (out)
"""

CENTER = """x0, x1 = step.Copy().apply(E0)
total = step.Accum(fn=fn_add, b=1).apply(x0)
mean = step.Map(fn=fn_div_k).apply(total)
mean_k = step.Repeat(n=K).apply(mean)
S0 = step.Map(fn=fn_sub).apply((x1, mean_k))
return S0
"""


def test_renaming_comments_and_layout_collapse():
    assert canonical_form(ROUTED) == canonical_form(ROUTED_RENAMED)
    assert dedup([ROUTED, ROUTED_RENAMED]) == [ROUTED]


def test_the_key_is_a_program_in_canonical_names():
    key = canonical_form(ROUTED)
    assert key.splitlines()[0] == "v0, v1 = step.Copy().apply(E1)"
    assert "for l0, l1 in zip(v2, v3)" in key
    assert parse_program(key)


def test_keyword_order_and_redundant_parentheses_collapse():
    a = "y = step.Accum(fn=fn_add, b=1).apply(E0)\nreturn y\n"
    b = "acc = step.Accum(b=1, fn=fn_add).apply((E0))\nreturn (acc)\n"
    assert canonical_form(a) == canonical_form(b)


@pytest.mark.parametrize("change", [
    ("fn=fn_add, b=1", "fn=fn_add, b=2"),  # a keyword value
    ("step.Accum", "step.Scan"),  # an operator
    ("(x1, mean_k)", "(mean_k, x1)"),  # argument order
    ("fn=fn_sub", "fn=fn_add"),  # a fn
    ("n=K", "n=K_value"),  # a different spelling of a size is kept apart (conservative)
    ("return S0", "return mean_k"),  # what is returned
    ("apply(x0)", "apply(x1)"),  # x1 used twice and x0 never: another program
])
def test_real_changes_do_not_collapse(change):
    old, new = change
    other = CENTER.replace(old, new, 1)
    assert other != CENTER
    assert canonical_form(other) != canonical_form(CENTER)
    assert len(dedup([CENTER, other])) == 2


def test_swapping_which_copy_feeds_which_consumer_collapses():
    swapped = CENTER.replace("apply(x0)", "apply(TMP)").replace("(x1, mean_k)", "(x0, mean_k)").replace("TMP", "x1")
    assert swapped != CENTER
    assert canonical_form(swapped) == canonical_form(CENTER)


def test_reassignment_is_a_new_stream():
    a = "x = step.Map(fn=f).apply(E0)\nx = step.Map(fn=g).apply(x)\nreturn x\n"
    b = "x = step.Map(fn=f).apply(E0)\ny = step.Map(fn=g).apply(x)\nreturn y\n"
    c = "x = step.Map(fn=f).apply(E0)\ny = step.Map(fn=g).apply(x)\nreturn x\n"
    assert canonical_form(a) == canonical_form(b) != canonical_form(c)


def test_canonical_names_never_capture_an_input_name():
    a = "x = step.Zip().apply((v0, E0))\nreturn x\n"  # an input that happens to be named like a canonical name
    b = "x = step.Zip().apply((E0, v0))\nreturn x\n"
    assert canonical_form(a) != canonical_form(b)
    assert "v0" in canonical_form(a) and parse_program(canonical_form(a))


def test_unparsable_programs():
    assert canonical_form("import os\nreturn x\n") is None
    assert dedup(["import os", "import os", "import  os", ROUTED]) == ["import os", "import  os", ROUTED]


def test_select_shortest():
    long = CENTER
    short = "S0 = step.Map(fn=fn_center).apply(E0)\nreturn S0\n"
    short_verbose = ("# a comment does not count\nresult_with_a_long_name = step.Map(fn=fn_center).apply(E0)\n"
                     "return result_with_a_long_name\n")
    assert select_shortest([long, short_verbose, short]) == short  # same statements, fewer characters
    assert select_shortest([long, short_verbose]) == short_verbose  # fewer statements first
    assert select_shortest([short, short.replace("S0", "T0")]) == short  # a tie: the first
    assert select_shortest([]) is None
    assert select_shortest(["not a program", short]) == short
    assert program_size(short) == (2, len("S0 = step.Map(fn=fn_center).apply(E0)") + len("return S0"))


# -- property: random renaming + comments + blank lines never change the key ----------


def _all_programs() -> list[str]:
    out = [load_knowledge().example_map[n].impl for n, _ in load_knowledge().examples()]
    out += [t.impl for t in load_benchmark().values() if t.impl]
    return out


PROGRAMS = _all_programs()


def _rename(program: str, rng: random.Random) -> str:
    parsed = parse_program(program)
    defined = []
    for s in parsed.statements:
        for name in getattr(s, "targets", ()) + ((s.target,) if hasattr(s, "target") else ()) + getattr(s, "loop_vars", ()):
            if name not in defined:
                defined.append(name)
    fresh = {n: f"z{rng.randrange(10**6)}_{i}" for i, n in enumerate(defined)}
    # keyword names (`a=1`, written without spaces) are not variables
    out = re.sub(r"\b[A-Za-z_]\w*\b(?!=)", lambda m: fresh.get(m.group(0), m.group(0)), program)
    lines = []
    for line in out.splitlines():
        if rng.random() < 0.3:
            lines.append("# " + "".join(rng.choice("abc xyz") for _ in range(8)))
        if rng.random() < 0.2:
            lines.append("")
        lines.append(line + ("  # note" if rng.random() < 0.3 else ""))
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(PROGRAMS) - 1), st.integers(0, 2**32))
def test_random_renamings_collapse(i, seed):
    program = PROGRAMS[i]
    renamed = _rename(program, random.Random(seed))
    assert canonical_form(renamed) == canonical_form(program)


def test_distinct_reference_programs_stay_distinct():
    """The 38 knowledge and benchmark programs: only textually equal ones share a key."""
    assert len({canonical_form(p) for p in PROGRAMS}) == len(set(PROGRAMS))
