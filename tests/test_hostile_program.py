"""Hostile programs: huge integer literals, repeated keywords, numbers in messages,
and the memory that a program's streams may hold at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepforge.benchmark.verifier import verify
from stepforge.simulator import ProgramSyntaxError, parse_program
from stepforge.simulator.errors import format_int
from stepforge.simulator.program import MAX_INT_LITERAL
from stepforge.simulator.shapes import Dim, format_shape

TASK = "norm/G_0_8_01"  # E0: fp32 [D, N]; returns S0 of the same shape
BIG = "*".join(["2147483648"] * 300)  # each factor is a legal literal; the product has 2800 digits

HUGE_LITERALS = [
    ("hex", "0x" + "f" * 4000),
    ("binary", "0b" + "1" * 15000),
    ("octal", "0o" + "7" * 5000),
    ("decimal", "9" * 4000),
    ("underscored", "1_" * 2000 + "1"),
    ("negative_hex", "-0x" + "f" * 4000),
    ("just_past_the_bound", str(MAX_INT_LITERAL + 1)),
]


@pytest.mark.parametrize("where", ["Repeat(n={})", "Reshape(L=[1], S={})", "Promote(b={})", "Flatten(L=[1, {}])",
                                   "Reshape(L=[1], S=K*{})"])
@pytest.mark.parametrize("name,literal", HUGE_LITERALS, ids=[n for n, _ in HUGE_LITERALS])
def test_huge_integer_literal_is_a_syntax_error_naming_the_line(where, name, literal):
    text = "a = step.Map(fn=f).apply(E0)\nX = step." + where.format(literal) + ".apply(a)\nreturn X"
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(text)
    assert err.value.line == 2
    assert "too large" in err.value.message and "2**31" in err.value.message
    assert len(err.value.message) < 200


def test_the_bound_itself_is_a_legal_literal():
    call = parse_program(f"X = step.Repeat(n={MAX_INT_LITERAL}).apply(E0)\nreturn X").statements[0].call
    assert call.kw()["n"] == MAX_INT_LITERAL
    assert call.label() == f"Repeat(n={MAX_INT_LITERAL})"


@pytest.mark.parametrize("kwargs", ["fn=a, fn=b", "fn=a, fn=a", "b=1, fn=f, b=2", "L=[1], S=2, L=[2]"])
def test_repeated_keyword_argument_is_rejected(kwargs):
    text = f"x = step.Map(fn=f).apply(E0)\nX = step.Accum({kwargs}).apply(x)\nreturn X"
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(text)
    assert err.value.line == 2 and "more than once" in err.value.message


def test_repeated_keyword_inside_a_comprehension_is_rejected():
    text = "FS = [f, g]\nYS = [step.Map(fn=h, fn=h).apply(x) for h, x in zip(FS, XS)]\nreturn YS"
    with pytest.raises(ProgramSyntaxError, match="line 2: .*more than once"):
        parse_program(text)


@settings(max_examples=60, deadline=None)
@given(st.integers())
def test_format_int_is_short_and_exact_when_small(n):
    text = format_int(n)
    assert len(text) <= 25
    if abs(n) < 10**15:
        assert int(text) == n


@pytest.mark.parametrize("digits", [16, 100, 4000, 5000, 100_000])
def test_format_int_of_huge_numbers_gives_the_magnitude(digits):
    assert format_int(10 ** (digits - 1)) == f"about 1e+{digits - 1}"
    assert format_int(-3 * 10 ** (digits - 1)) == f"about -3e+{digits - 1}"


def test_a_huge_dim_and_a_long_shape_print_short():
    huge = Dim.const(1) * (2**31) ** 500
    assert len(str(huge)) < 30 and len(str(huge / (2**31) ** 400 * Dim.sym("K"))) < 40
    shape = tuple(Dim.sym(f"S{i}") for i in range(500))
    text = format_shape(shape)
    assert len(text) < 120 and "488 more" in text and text.startswith("[S0, ") and text.endswith("S499]")


@pytest.mark.parametrize("program", [
    f"X = step.Repeat(n={BIG}).apply(E0)\nreturn X",
    f"X = step.Reshape(L=[1], S={BIG}).apply(E0)\nreturn X",
    "X0 = step.Repeat(n=1).apply(E0)\n"
    + "\n".join(f"X{i} = step.Repeat(n=2147483648*2147483648).apply(X{i - 1})" for i in range(1, 250))
    + "\nreturn X249",
    f"X = step.Repeat(n={BIG}).apply(E0)\nY = step.Accum(fn=fn_add, b=1).apply(X)\nreturn Y",
])
def test_programs_with_huge_sizes_get_a_short_verdict(program):
    v = verify(TASK, program, seeds=(0,))
    assert not v.passed and v.stage in ("shape", "resource", "type")
    assert len(v.message) < 400, v.message
