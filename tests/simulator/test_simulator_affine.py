"""The affine rule (docs/language.md section 6): every stream consumed at most once."""

from __future__ import annotations

import pytest

from stepforge.simulator import check_affine, parse_program


def violations(text):
    return {(v.name, v.defined_line, v.lines) for v in check_affine(parse_program(text))}


def test_clean_program_has_no_violation():
    text = """a = step.Map(fn=f).apply(E0)
b = step.Accum(fn=g, b=1).apply(a)
return b"""
    assert check_affine(parse_program(text)) == []


def test_input_consumed_twice():
    text = """a = step.Map(fn=f).apply(E0)
b = step.Map(fn=g).apply(E0)
return a, b"""
    (v,) = check_affine(parse_program(text))
    assert (v.name, v.defined_line, v.lines) == ("E0", None, (1, 2))
    assert "stream E0 (a program input) is consumed 2 times (lines 1, 2)" in v.message
    assert "Copy it" in v.message and "\n" not in v.message


def test_copy_fixes_it():
    text = """x, y = step.Copy().apply(E0)
a = step.Map(fn=f).apply(x)
b = step.Map(fn=g).apply(y)
return a, b"""
    assert check_affine(parse_program(text)) == []


def test_defined_stream_consumed_three_times_names_definition_line():
    text = """a = step.Map(fn=f).apply(E0)
b = step.Map(fn=f).apply(a)
c = step.Map(fn=f).apply(a)
d = step.Zip().apply((b, a))
return c, d"""
    (v,) = check_affine(parse_program(text))
    assert (v.name, v.defined_line, v.lines) == ("a", 1, (2, 3, 4))
    assert "stream a (defined on line 1) is consumed 3 times (lines 2, 3, 4)" in v.message


def test_use_inside_a_tuple_counts():
    assert violations("z = step.Zip().apply((E0, E0))\nreturn z") == {("E0", None, (1, 1))}
    assert violations("z = step.Zip().apply((E0, E1))\ny = step.Map(fn=f).apply(E1)\nreturn z, y") == {("E1", None, (1, 2))}
    nested = "z = step.Map(fn=f).apply(((E0, E1), E1))\nreturn z"
    assert violations(nested) == {("E1", None, (1, 1))}


def test_return_counts():
    text = """a = step.Map(fn=f).apply(E0)
b = step.Map(fn=f).apply(a)
return a, b"""
    assert violations(text) == {("a", 1, (2, 3))}
    assert violations("a = step.Map(fn=f).apply(E0)\nreturn a, a") == {("a", 1, (2, 2))}


def test_comprehension_list_counts():
    text = """parts = step.Partition(N=E).apply((E0, E1))
a = [step.Map(fn=f).apply(p) for p in parts]
b = [step.Map(fn=g).apply(p) for p in parts]
return E2"""
    assert violations(text) == {("parts", 1, (2, 3))}


def test_comprehension_list_and_merge_count():
    text = """i1, i2 = step.Copy().apply(E1)
parts = step.Partition(N=E).apply((E0, i1))
outs = [step.Map(fn=f).apply(p) for p in parts]
y = step.Merge(fn=add).apply((parts, i2))
return y"""
    assert violations(text) == {("parts", 2, (3, 4))}


def test_outer_stream_used_in_comprehension_body_counts():
    text = """parts = step.Partition(N=E).apply((E0, E1))
outs = [step.Zip().apply((p, E2)) for p in parts]
return E3"""
    assert violations(text) == {("E2", None, (2, 2))}


def test_loop_variable_used_twice_counts():
    text = """parts = step.Partition(N=E).apply((E0, E1))
outs = [step.Zip().apply((p, p)) for p in parts]
return E3"""
    assert violations(text) == {("p (loop variable)", 2, (2, 2))}


def test_fn_lists_and_fn_names_do_not_count():
    text = """parts = step.Partition(N=E).apply((E0, E1))
parts2 = step.Partition(N=E).apply((E2, E3))
fs = [f, g]
a = [step.Map(fn=h).apply(p) for p, h in zip(parts, fs)]
b = [step.Map(fn=h).apply(p) for p, h in zip(parts2, fs)]
c = [step.Map(fn=f).apply(p) for p, h in zip(a, [f, g])]
return E4"""
    assert check_affine(parse_program(text)) == []


def test_fn_list_reassigned_as_stream_counts_again():
    text = """fs = [f, g]
fs = step.Map(fn=f).apply(E0)
a = step.Map(fn=f).apply(fs)
b = step.Map(fn=f).apply(fs)
return a, b"""
    assert violations(text) == {("fs", 2, (3, 4))}


def test_reassignment_is_a_new_stream():
    text = """x = step.Map(fn=f).apply(E0)
y = step.Map(fn=f).apply(x)
x = step.Map(fn=f).apply(y)
x = step.Map(fn=f).apply(x)
return x"""
    assert check_affine(parse_program(text)) == []
    text2 = """x = step.Map(fn=f).apply(E0)
y = step.Map(fn=f).apply(x)
x = step.Map(fn=f).apply(y)
z = step.Map(fn=f).apply(x)
return x, z"""
    assert violations(text2) == {("x", 3, (4, 5))}


def test_copy_into_the_same_name():
    text = """E0, b = step.Copy().apply(E0)
a = step.Map(fn=f).apply(E0)
c = step.Zip().apply((a, b))
return c"""
    assert check_affine(parse_program(text)) == []


@pytest.mark.parametrize("n_uses", [2, 3, 5])
def test_every_violation_reported_with_all_lines(n_uses):
    lines = [f"a{i} = step.Map(fn=f).apply(E0)" for i in range(n_uses)]
    lines += [f"b{i} = step.Map(fn=f).apply(E1)" for i in range(2)]
    text = "\n".join(lines) + "\nreturn " + ", ".join([f"a{i}" for i in range(n_uses)] + ["b0", "b1"])
    found = violations(text)
    assert found == {("E0", None, tuple(range(1, n_uses + 1))), ("E1", None, (n_uses + 1, n_uses + 2))}


def test_unused_streams_are_fine():
    assert check_affine(parse_program("a, b = step.Copy().apply(E0)\nreturn a")) == []
