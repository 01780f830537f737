"""The safe program parser: only the STeP forms of docs/language.md section 3 parse;
everything else is a ProgramSyntaxError naming the line, and nothing is run."""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from program_gen import fn_table, run, stream

from stepforge.simulator import ProgramSyntaxError, parse_program, run_program, typecheck
from stepforge.simulator.program import Apply, Comprehension, FnList, NameRef, Return, SizeExpr

OK_HEAD = "a = step.Map(fn=f).apply(E0)\n"

# (id, text, line of the error, fragment of the message)
REJECTED = [
    ("import", "import os\nreturn E0", 1, "an import"),
    ("from_import", OK_HEAD + "from os import system\nreturn a", 2, "an import"),
    ("attribute_data", "x = E0.data\nreturn x", 1, "an attribute access"),
    ("attribute_in_arg", "x = step.Map(fn=f).apply(E0.data)\nreturn x", 1, "an attribute access"),
    ("attribute_in_kwarg", "x = step.Map(fn=f.__globals__).apply(E0)\nreturn x", 1, "an attribute access"),
    ("step_class", "x = step.__class__\nreturn x", 1, "an attribute access"),
    ("step_class_call", "x = step.__class__().apply(E0)\nreturn x", 1, "unknown operator step.__class__"),
    ("dunder_target", "__builtins__ = step.Map(fn=f).apply(E0)\nreturn E0", 1, "'__builtins__'"),
    ("dunder_arg", "x = step.Map(fn=f).apply(__builtins__)\nreturn x", 1, "'__builtins__'"),
    ("dunder_kwarg", "x = step.Map(fn=__import__).apply(E0)\nreturn x", 1, "'__import__'"),
    ("dunder_return", OK_HEAD + "return __name__", 2, "'__name__'"),
    ("step_as_target", "step = step.Map(fn=f).apply(E0)\nreturn step", 1, "'step'"),
    ("open_call", OK_HEAD + "x = open('/tmp/x', 'w')\nreturn a", 2, "a call to open"),
    ("print_call", OK_HEAD + "print(a)\nreturn a", 2, "a bare expression"),
    ("print_assign", OK_HEAD + "x = print(a)\nreturn a", 2, "a call to print"),
    ("eval_call", "x = eval('1')\nreturn x", 1, "a call to eval"),
    ("import_call", "x = __import__('os').system('true')\nreturn x", 1, "a call to __import__('os').system"),
    ("exec_in_kwarg", "x = step.Map(fn=exec('1')).apply(E0)\nreturn x", 1, "a call to exec"),
    ("call_in_arg", "x = step.Map(fn=f).apply(open('x'))\nreturn x", 1, "a call to open"),
    ("call_in_tuple_arg", "x = step.Zip().apply((E0, open('x')))\nreturn x", 1, "a call to open"),
    ("op_not_on_step", "x = stp.Map(fn=f).apply(E0)\nreturn x", 1, "expected step.<Op>(...)"),
    ("bare_op", "x = Map(fn=f).apply(E0)\nreturn x", 1, "expected step.<Op>(...)"),
    ("no_apply", "x = step.Map(fn=f)\nreturn x", 1, "expected step.<Op>(...).apply(...)"),
    ("other_method", "x = step.Map(fn=f).run(E0)\nreturn x", 1, "expected step.<Op>(...).apply(...)"),
    ("double_apply", "x = step.Map(fn=f).apply(E0).apply(E1)\nreturn x", 1, "expected step.<Op>(...)"),
    ("apply_kwargs", "x = step.Map(fn=f).apply(data=E0)\nreturn x", 1, "exactly one argument"),
    ("apply_two_args", "x = step.Zip().apply(E0, E1)\nreturn x", 1, "exactly one argument"),
    ("lambda_stmt", "f = lambda x: x\nreturn E0", 1, "a lambda"),
    ("lambda_kwarg", "x = step.Map(fn=lambda i: i).apply(E0)\nreturn x", 1, "a lambda"),
    ("for_loop", "for i in E0:\n    x = step.Map(fn=f).apply(i)\nreturn E0", 1, "a for loop"),
    ("while_loop", OK_HEAD + "while True:\n    pass\nreturn a", 2, "a while loop"),
    ("if_stmt", OK_HEAD + "if a:\n    b = step.Map(fn=f).apply(a)\nreturn a", 2, "an if statement"),
    ("if_expr", "x = step.Map(fn=f).apply(E0) if E1 else E0\nreturn x", 1, "IfExp"),
    ("with_stmt", "with open('x') as fh:\n    pass\nreturn E0", 1, "a with statement"),
    ("try_stmt", "try:\n    x = step.Map(fn=f).apply(E0)\nexcept Exception:\n    pass\nreturn x", 1, "a try statement"),
    ("def_stmt", OK_HEAD + "def g(x):\n    return x\nreturn a", 2, "a function definition"),
    ("class_stmt", "class C:\n    pass\nreturn E0", 1, "a class definition"),
    ("decorated_def", "@print\ndef g():\n    pass\nreturn E0", 2, "a function definition"),
    ("async_def", "async def g():\n    pass\nreturn E0", 1, "AsyncFunctionDef"),
    ("global_stmt", "global x\nreturn E0", 1, "a global statement"),
    ("del_stmt", OK_HEAD + "del a\nreturn E0", 2, "a del statement"),
    ("aug_assign", OK_HEAD + "a += E0\nreturn a", 2, "an augmented assignment"),
    ("ann_assign", "x: int = step.Map(fn=f).apply(E0)\nreturn x", 1, "AnnAssign"),
    ("assert_stmt", "assert E0\nreturn E0", 1, "Assert"),
    ("raise_stmt", "raise SystemExit\nreturn E0", 1, "Raise"),
    ("pass_stmt", "pass\nreturn E0", 1, "Pass"),
    ("chained_assign", "x = y = step.Map(fn=f).apply(E0)\nreturn x", 1, "chained assignment"),
    ("comprehension_if", "ys = [step.Map(fn=f).apply(p) for p in parts if p]\nreturn E0", 1, "may not filter with `if`"),
    ("comprehension_nested", "ys = [step.Map(fn=f).apply(p) for q in parts for p in q]\nreturn E0", 1, "one `for` clause"),
    ("comprehension_range", "ys = [step.Map(fn=f).apply(E0) for i in range(3)]\nreturn E0", 1, "a call to range"),
    ("comprehension_enumerate", "ys = [step.Map(fn=f).apply(p) for i, p in enumerate(parts)]\nreturn E0", 1, "a call to enumerate"),
    ("comprehension_zip_kw", "ys = [step.Map(fn=f).apply(p) for p, g in zip(parts, fs, strict=True)]\nreturn E0", 1, "a call to zip"),
    ("comprehension_zip_star", "ys = [step.Map(fn=f).apply(p) for p, g in zip(*lists)]\nreturn E0", 1, "a starred expression"),
    ("comprehension_elt", "ys = [p for p in parts]\nreturn E0", 1, "expected step.<Op>(...).apply(...)"),
    ("comprehension_attr_iter", "ys = [step.Map(fn=f).apply(p) for p in E0.parts]\nreturn E0", 1, "an attribute access"),
    ("comprehension_vars", "ys = [step.Map(fn=f).apply(p) for p, g in zip(parts)]\nreturn E0", 1, "2 loop variable(s) for 1 list(s)"),
    ("generator", "ys = list(step.Map(fn=f).apply(p) for p in parts)\nreturn E0", 1, "a call to list"),
    ("set_comp", "ys = {step.Map(fn=f).apply(p) for p in parts}\nreturn E0", 1, "a set comprehension"),
    ("dict_literal", "ys = {'a': E0}\nreturn E0", 1, "Dict"),
    ("getattr_call", "x = getattr(step, 'Map')(fn=f).apply(E0)\nreturn x", 1, "a call to getattr"),
    ("getattr_assign", "x = getattr(E0, 'data')\nreturn x", 1, "a call to getattr"),
    ("subscript_arg", "a, b = step.Copy().apply(E0)\nx = step.Map(fn=f).apply(parts[0])\nreturn x", 2, "a subscript"),
    ("subscript_value", "x = parts[0]\nreturn x", 1, "a subscript"),
    ("subscript_target", "parts[0] = step.Map(fn=f).apply(E0)\nreturn E0", 1, "a subscript"),
    ("subscript_return", OK_HEAD + "return parts[0]", 2, "a subscript"),
    ("subscript_kwarg", "x = step.Map(fn=fs[0]).apply(E0)\nreturn x", 1, "a subscript"),
    ("fstring_stmt", OK_HEAD + "f'{__import__(\"os\")}'\nreturn a", 2, "a bare expression"),
    ("fstring_kwarg", "x = step.Map(fn=f'{g}').apply(E0)\nreturn x", 1, "an f-string"),
    ("string_stmt", "'''a docstring'''\n" + OK_HEAD + "return a", 1, "a bare expression"),
    ("string_kwarg", "x = step.Map(fn='f').apply(E0)\nreturn x", 1, "a literal"),
    ("float_kwarg", "x = step.Repeat(n=1.5).apply(E0)\nreturn x", 1, "a literal"),
    ("bool_kwarg", "x = step.Repeat(n=True).apply(E0)\nreturn x", 1, "a literal"),
    ("join_call", "x = ''.join(['a'])\nreturn x", 1, "a call to ''.join"),
    ("join_in_kwarg", "x = step.Map(fn=''.join('f')).apply(E0)\nreturn x", 1, "a call to ''.join"),
    ("arith_kwarg", "x = step.Repeat(n=M + 1).apply(E0)\nreturn x", 1, "an arithmetic expression"),
    ("pow_kwarg", "x = step.Repeat(n=M ** 2).apply(E0)\nreturn x", 1, "an arithmetic expression"),
    ("multiply_list_kwarg", "x = step.Repeat(n=M * [2]).apply(E0)\nreturn x", 1, "only sizes can be multiplied"),
    ("walrus_arg", "x = step.Map(fn=f).apply((y := E0))\nreturn x", 1, "an assignment expression"),
    ("walrus_kwarg", "x = step.Map(fn=(g := f)).apply(E0)\nreturn x", 1, "an assignment expression"),
    ("starred_arg", "x = step.Zip().apply((*E0,))\nreturn x", 1, "a starred expression"),
    ("starred_target", "*x, y = step.Copy().apply(E0)\nreturn y", 1, "a starred expression"),
    ("starred_return", OK_HEAD + "return *a,", 2, "a starred expression"),
    ("double_star_kwargs", "x = step.Map(**kw).apply(E0)\nreturn x", 1, "`**` arguments"),
    ("positional_op_arg", "x = step.Accum(f, 1).apply(E0)\nreturn x", 1, "keyword arguments only"),
    ("unknown_op", "x = step.Conv(fn=f).apply(E0)\nreturn x", 1, "unknown operator step.Conv"),
    ("unknown_op_lower", "x = step.map(fn=f).apply(E0)\nreturn x", 1, "unknown operator step.map"),
    ("list_of_calls", "fs = [print]\nx = [open('x')]\nreturn E0", 2, "a call to open"),
    ("list_nested", "fs = [[f]]\nreturn E0", 1, "expected a name"),
    ("tuple_value", "x = (E0, E1)\nreturn E0", 1, "Tuple"),
    ("name_value", "x = E0\nreturn x", 1, "expected step.<Op>(...).apply(...)"),
    ("empty_tuple_arg", "x = step.Zip().apply(())\nreturn x", 1, "an empty tuple"),
    ("bare_return", OK_HEAD + "return", 2, "`return` needs the output"),
    ("no_return", OK_HEAD + "b = step.Map(fn=f).apply(a)\n", 2, "must end with `return`"),
    ("after_return", OK_HEAD + "return a\nb = step.Map(fn=f).apply(a)", 3, "after `return`"),
    ("return_call", OK_HEAD + "return open('x')", 2, "a call to open"),
    ("syntax_error", OK_HEAD + "b = step.Map(fn=f).apply(a\nreturn b", 2, "Python syntax error"),
    ("await_expr", "x = await step.Map(fn=f).apply(E0)\nreturn x", 1, "an await"),
    ("yield_expr", "x = yield E0\nreturn x", 1, "a yield"),
    ("match_stmt", "match E0:\n    case _:\n        pass\nreturn E0", 1, "Match"),
    ("unpack_repeat", "a, a = step.Copy().apply(E0)\nreturn a", 1, "repeats a name"),
    ("unpack_nested", "(a, b), c = step.Copy().apply(E0)\nreturn c", 1, "expected a name"),
    ("loop_var_repeat", "ys = [step.Map(fn=f).apply(p) for p, p in zip(parts, parts)]\nreturn E0", 1, "loop variables repeat"),
]


@pytest.mark.parametrize("case", REJECTED, ids=[c[0] for c in REJECTED])
def test_rejected(case):
    _, text, line, fragment = case
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(text)
    e = err.value
    assert e.line == line, e.message
    assert e.message.startswith(f"line {line}: "), e.message
    assert fragment in e.message, (fragment, e.message)
    assert "\n" not in e.message
    assert e.stage == "parse"


def test_not_text():
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(b"return E0")  # type: ignore[arg-type]
    assert "must be text" in err.value.message


def test_valid_program_with_comments_and_blank_lines():
    text = """# a routed expert layer

# route the tokens
i1, i2 = step.Copy().apply(E1)   # one copy per consumer
parts = step.Partition(N=E_value).apply((E0, i1))

fs = [f0, f1]  # one fn per route
outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, fs)]
outs2 = [step.Map(fn=g).apply(p) for p in outs]
outs3 = [step.Map(fn=f).apply((p, q)) for p, q, f in zip(outs2, outs, [f0, f1])]
y = step.Merge(fn=add).apply((outs3, i2))  # back in token order
z = step.Repeat(n=K*N).apply(y)
w = step.Flatten(L=[1, 2]).apply(z)
v = step.Promote(b=-1).apply(w)
return y, z
"""
    prog = parse_program(text)
    kinds = [type(s).__name__ for s in prog.statements]
    assert kinds == ["Apply", "Apply", "FnList", "Comprehension", "Comprehension", "Comprehension",
                     "Apply", "Apply", "Apply", "Apply", "Return"]
    assert [s.line for s in prog.statements] == [4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    copy, part, fl, comp = prog.statements[:4]
    assert isinstance(copy, Apply) and copy.unpack and copy.targets == ("i1", "i2") and copy.arg == "E1"
    assert part.call.op == "Partition" and part.call.kw() == {"N": NameRef("E_value")} and part.arg == ("E0", "i1")
    assert isinstance(fl, FnList) and fl.fns == ("f0", "f1")
    assert isinstance(comp, Comprehension) and comp.loop_vars == ("p", "f") and comp.iterables == ("parts", "fs")
    assert prog.statements[4].iterables == ("outs",)
    assert prog.statements[5].iterables == ("outs2", "outs", ("f0", "f1")) and prog.statements[5].arg == ("p", "q")
    assert prog.statements[7].call.kw() == {"n": SizeExpr((NameRef("K"), NameRef("N")))}
    assert prog.statements[8].call.kw() == {"L": (1, 2)}
    assert prog.statements[9].call.kw() == {"b": -1}
    assert isinstance(prog.statements[-1], Return) and prog.returns.names == ("y", "z")
    assert prog.source == text


def test_semicolons_and_parenthesised_return():
    prog = parse_program("a, b = step.Copy().apply(E0); c = step.Zip().apply((a, b))\nreturn (c)")
    assert len(prog) == 3 and prog.returns.names == ("c",)


# ---------------------------------------------------------------------------
# nothing of a rejected program runs


def _marker():
    path = f"/tmp/stepforge-parser-{uuid.uuid4().hex}"
    assert not os.path.exists(path)
    return path


PAYLOADS = [
    "open('{p}', 'w')",
    "x = open('{p}', 'w')",
    "x = __import__('os').system('touch {p}')",
    "__import__('os').system('touch {p}')",
    "x = step.Map(fn=open('{p}', 'w')).apply(E0)",
    "x = step.Map(fn=f).apply(open('{p}', 'w'))",
    "x = [open('{p}', 'w') for p in parts]",
    "x = [step.Map(fn=f).apply(p) for p in [open('{p}', 'w')]]",
    "x = [step.Map(fn=f).apply(p) for p, g in zip(parts, open('{p}', 'w'))]",
    "x = step.Repeat(n=__import__('os').system('touch {p}')).apply(E0)",
    "f'{{open(\"{p}\", \"w\")}}'",
    "with open('{p}', 'w') as fh:\n    pass",
    "def g(x=open('{p}', 'w')):\n    pass",
    "class C(open('{p}', 'w')):\n    pass",
    "import os; os.system('touch {p}')",
    "exec(\"open('{p}', 'w')\")",
    "y = (lambda: open('{p}', 'w'))()",
    "for i in [open('{p}', 'w')]:\n    pass",
    "x = step.Map(fn=f).apply(E0)\nreturn x\nopen('{p}', 'w')",
    "x: open('{p}', 'w') = step.Map(fn=f).apply(E0)",
]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_rejected_text_never_runs(payload, position):
    marker = _marker()
    bad = payload.format(p=marker)
    head = "a = step.Map(fn=f).apply(E0)\nb = step.Map(fn=f).apply(a)\n"
    tail = "return b"
    text = {"first": bad + "\n" + head + tail, "middle": head + bad + "\n" + tail, "last": head + bad + "\n" + tail}[position]
    if position == "last":
        text = head + tail + "\n" + bad
    try:
        with pytest.raises(ProgramSyntaxError) as err:
            prog = parse_program(text)
            # not reached for any payload; if parsing accepted it, running must not touch the file either
            fns = fn_table({"M": 2}, [("f", "fp32", "fp32", "[input[0]]")])
            run_program(prog, {"E0": stream("fp32", ["M"], torch.zeros(2))}, fns, {"M": 2})
        assert err.value.line is not None
        assert not os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)


def test_marker_mechanism_works():
    # the payloads above would create the marker if they ran
    marker = _marker()
    try:
        exec(compile(PAYLOADS[2].format(p=marker), "<t>", "exec"), {})
        assert os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)


# ---------------------------------------------------------------------------
# size and depth limits


def test_too_long_is_rejected():
    text = "a = step.Map(fn=f).apply(E0)\n" * 1000 + "return a"
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(text)
    assert "characters long" in err.value.message


def test_too_many_statements_is_rejected():
    text = "a = step.Copy().apply(E0)\n" * 400 + "return a"
    with pytest.raises(ProgramSyntaxError) as err:
        parse_program(text)
    assert "statements" in err.value.message


def _deep(kind: str, n: int) -> str:
    if kind == "product":
        return "x = step.Repeat(n=" + "*".join(["M"] * n) + ").apply(E0)\nreturn x"
    if kind == "attribute":
        return "x = " + "a." * n + "b(E0)\nreturn x"
    if kind == "attribute_value":
        return "x = " + "a." * n + "b\nreturn x"
    if kind == "subscript":
        return "x = step.Map(fn=f" + "[0]" * n + ").apply(E0)\nreturn x"
    if kind == "parens":
        return "x = step.Map(fn=" + "(" * n + "f" + ")" * n + ").apply(E0)\nreturn x"
    if kind == "kw_tuple":
        return "x = step.Flatten(L=" + "(" * n + "1" + ",)" * n + ").apply(E0)\nreturn x"
    if kind == "arg_tuple":
        return "x = step.Zip().apply(" + "(" * n + "E0" + ",)" * n + ")\nreturn x"
    if kind == "calls":
        return "x = " + "f(" * n + ")" * n + "\nreturn x"
    if kind == "unary":
        return "x = step.Repeat(n=" + "-" * n + "1).apply(E0)\nreturn x"
    if kind == "lists":
        return "x = " + "[" * n + "f" + "]" * n + "\nreturn x"
    raise AssertionError(kind)


KINDS = ["product", "attribute", "attribute_value", "subscript", "parens", "kw_tuple", "arg_tuple", "calls", "unary", "lists"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [50, 180, 600, 990, 2000, 6000])
def test_deep_nesting_never_escapes_as_recursion_error(kind, n):
    # Regression: chains of ~500..2000 (a.b.c..., M*M*...) parsed but blew the recursion
    # limit inside the whitelist walk, and the RecursionError escaped parse_program.
    text = _deep(kind, n)
    if len(text) > 20_000:
        text = text[:20_000]
    try:
        parse_program(text)
    except ProgramSyntaxError as e:
        assert "\n" not in e.message and len(e.message) < 300
        return
    # what parses is a product of sizes, or a (harmless) deeply parenthesised value: both are typed later
    assert kind in ("product", "parens", "kw_tuple"), kind


def test_program_in_a_program_is_just_names():
    # names of Python builtins are only names: they are neither called nor resolved by the parser
    prog = parse_program("x = step.Map(fn=eval).apply(exec)\nreturn x")
    assert prog.statements[0].call.kw() == {"fn": NameRef("eval")} and prog.statements[0].arg == "exec"
    fns = fn_table({"M": 2}, [("f", "fp32", "fp32", "[input[0]]")])
    from stepforge.simulator import StepTypeError, StreamType, parse_dims, parse_dtype

    with pytest.raises(StepTypeError) as err:
        typecheck(prog, {"exec": StreamType(parse_dtype("fp32"), parse_dims(["M"]))}, fns, {"M": 2})
    assert "fn=eval is not a fn of this task" in err.value.message
    out = run("x = step.Map(fn=f).apply(exec)\nreturn x", {"exec": stream("fp32", ["M"], torch.ones(2))}, fns, {"M": 2},
              "vectorised")
    assert torch.equal(out[0].data, torch.ones(2))
