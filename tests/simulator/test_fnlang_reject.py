"""Bodies outside the fn language are rejected with a message naming the fn, the line and the
construct, and none of them runs: every test body would leave a trace (a file under tmp_path,
a call of a spied torch.load/torch.save/torch.from_file/builtins.open/os.system, a call of a
spied vocabulary function) and the test asserts that no trace exists. Allocations past the
element cap are refused before the allocating call is made.
"""

from __future__ import annotations

import builtins
import os

import pytest
import torch

from stepforge.simulator import fnlang_vocab
from stepforge.simulator.errors import FnLanguageError, ResourceError
from stepforge.simulator.fnlang import MAX_BODY_CHARS, MAX_DEPTH, MAX_STATEMENTS, make_open_fn
from stepforge.simulator.fns import build_namespace

FN = "fn_evil"


@pytest.fixture
def trace(tmp_path, monkeypatch):
    """Spies on everything a body could use to act; `trace.calls` lists what was called."""
    calls: list[str] = []
    target = tmp_path / "pwned"

    def spy(name):
        def called(*args, **kwargs):
            calls.append(name)
            target.write_text(name)
        return called

    for obj, attr in ((torch, "load"), (torch, "save"), (torch, "from_file"), (os, "system")):
        monkeypatch.setattr(obj, attr, spy(f"{obj.__name__}.{attr}"))
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (calls.append("open"), real_open(*a, **k))[1])
    def through(name, real):
        if real is None:
            return None
        return lambda *a, **k: (calls.append(f"vocabulary {name}"), real(*a, **k))[1]

    for name in ("exp", "zeros", "repeat", "arange", "one_hot", "reshape"):
        entry = fnlang_vocab.KNOWN[name]
        monkeypatch.setitem(fnlang_vocab.KNOWN, name, fnlang_vocab.Entry(
            name, through(name, entry.function), through(name, entry.method), entry.size))

    class Trace:
        path = str(target)

        def __init__(self):
            self.calls = calls

        def clean(self):
            return not calls and not target.exists()

    return Trace()


def build(body: str, *, vocabulary=None, max_elements=2**27, output="Buffer(fp32, [D])", init=None):
    ns = build_namespace({"D": 16})
    ns["input_data"]["W"] = torch.ones(16, 16)
    return make_open_fn("evil", FN, "Buffer(fp32, [D])", output, body, init, namespace=ns, parameters=["W"],
                        vocabulary=vocabulary, max_elements=max_elements)


def reject(body: str, line, construct: str, trace, **kw) -> FnLanguageError:
    with pytest.raises(FnLanguageError) as info:
        build(body.replace("PATH", trace.path), **kw)
    err = info.value
    assert err.message.startswith(f"fn {FN}, line {line}: "), err.message
    assert construct in err.message, err.message
    assert err.stage == "fns" and "\n" not in err.message
    assert trace.clean(), f"the body ran: {trace.calls}"
    return err


CASES = [
    # imports
    ("x = input[0]\nimport os\nos.system('touch PATH')\nreturn [x]", 2, "import is not allowed"),
    ("from os import system\nsystem('touch PATH')\nreturn [input[0]]", 1, "import is not allowed"),
    ("m = __import__('os')\nreturn [input[0]]", 1, "calling '__import__' is not allowed"),
    # dunder and attribute escapes
    ("c = input.__class__\nreturn [input[0]]", 1, "attribute '__class__' is not allowed"),
    ("d = torch.__dict__\nreturn [d['load']('PATH')]", 1, "attribute '__dict__' is not allowed"),
    ("b = ().__class__.__bases__\nreturn [input[0]]", 1, "attribute '__bases__' is not allowed"),
    ("return [input[0].__class__.__subclasses__()]", 1, "attribute '__subclasses__' is not allowed"),
    ("return [input[0].data]", 1, "attribute 'data' is not allowed"),
    ("t = torch.float64\nreturn [input[0]]", 1, "attribute 'float64' is not allowed"),
    # getattr, eval, open, exec
    ("f = getattr(torch, 'load')\nreturn [f('PATH')]", 1, "calling 'getattr' is not allowed"),
    ("return [eval('torch.load(\"PATH\")')]", 1, "calling 'eval' is not allowed"),
    ("x = input[0]\nopen('PATH', 'w')\nreturn [x]", 2, "an expression statement before the last line"),
    ("f = open('PATH', 'w')\nreturn [input[0]]", 1, "calling 'open' is not allowed"),
    ("exec('import os')\n", 1, "calling 'exec' is not allowed"),
    # string tricks
    ("s = 'torch.load'\nreturn [input[0]]", 1, "a string literal is not allowed"),
    ("return [input_data['__builtins__']]", 1, "the task has no parameter '__builtins__'"),
    ("return [input_data[input[0]]]", 1, "input_data[...] needs a parameter name in quotes"),
    ("k = f'{input}'\nreturn [input[0]]", 1, "an f-string is not allowed"),
    ("return [input[0].sum(dim='x')]", 1, "a string literal is not allowed"),
    ("x = input_data\nreturn [input[0]]", 1, "input_data is only allowed as input_data['P']"),
    # lambdas, loops, comprehensions, if, def, with, try, global
    ("f = lambda: torch.save(input, 'PATH')\nreturn [input[0]]", 1, "lambda is not allowed"),
    ("x = input[0]\nfor i in range(3):\n    x = x + 1\nreturn [x]", 2, "a loop ('for') is not allowed"),
    ("x = input[0]\nwhile True:\n    x = x + 1\nreturn [x]", 2, "a loop ('while') is not allowed"),
    ("return [torch.stack([v for v in input])]", 1, "a comprehension is not allowed"),
    ("x = input[0]\nif True:\n    x = x + 1\nreturn [x]", 2, "'if' is not allowed"),
    ("return [input[0] if True else input[0]]", 1, "a conditional expression is not allowed"),
    ("def f(x):\n    return x\nreturn [input[0]]", 1, "'def' is not allowed"),
    ("with open('PATH', 'w') as f:\n    pass\nreturn [input[0]]", 1, "'with' is not allowed"),
    ("try:\n    x = 1\nexcept Exception:\n    pass\nreturn [input[0]]", 1, "'try' is not allowed"),
    ("global torch\nreturn [input[0]]", 1, "'global' is not allowed"),
    ("x = input[0]\nx += 1\nreturn [x]", 2, "augmented assignment is not allowed"),
    ("x = input[0]\ndel x\nreturn [input[0]]", 2, "'del' is not allowed"),
    ("return [input[0] and input[0]]", 1, "'and'/'or' is not allowed"),
    ("return [{'a': input[0]}]", 1, "a dict is not allowed"),
    # non-vocabulary torch functions and torch namespaces
    ("x = torch.load('PATH')\nreturn [x]", 1, "the torch function 'load' is not in the vocabulary"),
    ("x = input[0]\ntorch.save(x, 'PATH')\nreturn [x]", 2, "an expression statement"),
    ("y = torch.save(input[0], 'PATH')\nreturn [input[0]]", 1, "the torch function 'save' is not in the vocabulary"),
    ("return [torch.from_file('PATH', True, 10)]", 1, "the torch function 'from_file' is not in the vocabulary"),
    ("return [torch.ops.aten.add(input[0], input[0])]", 1, "'torch.ops.aten.add' is not allowed"),
    ("return [torch.nn.functional.dropout(input[0])]", 1, "the torch function 'dropout' is not in the vocabulary"),
    ("return [torch.linalg.inv(input[0])]", 1, "'torch.linalg.inv' is not allowed"),
    ("return [input[0].to(torch.float64)]", 1, "the method 'to' is not in the vocabulary"),
    ("return [input[0].tolist()]", 1, "the method 'tolist' is not in the vocabulary"),
    ("return [input[0].cat(input[0])]", 1, "'cat' has no method form"),
    ("return [torch.exp(input[0], out=input[0])]", 1, "the keyword argument 'out' is not allowed"),
    ("return [torch.exp(**{'input': input[0]})]", 1, "'**' arguments are not allowed"),
    ("return [torch.exp(*input)]", 1, "'*' unpacking is not allowed"),
    ("return [torch.zeros(10**10)]", 1, "the torch function 'zeros' is not in the vocabulary"),
    ("return [input[0].repeat(100000, 100000)]", 1, "the method 'repeat' is not in the vocabulary"),
    ("return [math.e * input[0]]", 1, "attribute 'e' is not allowed"),
    # names, fields, literals, operators
    ("return [torch]", 1, "the name 'torch' on its own is not allowed"),
    ("return [y]", 1, "the name 'y' is not defined"),
    ("y = y + 1\nreturn [y]", 1, "the name 'y' is not defined"),
    ("return [state[0]]", 1, "'state' exists only in a fold"),
    ("return [input[1]]", 1, "input[1] is out of range"),
    ("i = 0\nreturn [input[i]]", 2, "input[...] takes an integer literal"),
    ("input = 3\nreturn [input]", 1, "assigning to the name 'input' is not allowed"),
    ("D_value = 3\nreturn [input[0]]", 1, "assigning to the name 'D_value' is not allowed"),
    ("x = input[0]\nx[0] = 1\nreturn [x]", 2, "assigning to a subscript is not allowed"),
    ("return [input[0] * 123456789012345678901234567890]", 1, "integer literal"),
    ("return [input[0] << 2]", 1, "the operator '<<' is not allowed"),
    ("return [~input[0]]", 1, "the operator '~' is not allowed"),
    ("return [0 < input[0] < 1]", 1, "a chained comparison is not allowed"),
    ("return [input[0][input[0] > 0]]", 1, "a comparison in a subscript is not allowed"),
    ("return [input[0]]\nx = 1", 1, "statements after 'return' are not allowed"),
    ("x = input[0]", 1, "the body must end with 'return [...]' or an expression"),
    ("return [input[0]", 1, "not Python syntax"),
]


@pytest.mark.parametrize("body,line,construct", CASES, ids=[c[2][:40] for c in CASES])
def test_rejected_and_never_run(body, line, construct, trace):
    reject(body, line, construct, trace)


def test_a_legal_prefix_does_not_run_before_a_rejection(trace):
    # the first line is inside the language and calls a (spied) vocabulary function
    reject("y = torch.exp(input[0])\nz = torch.load('PATH')\nreturn [y]", 2, "'load' is not in the vocabulary", trace)


def test_narrowed_vocabulary_rejects_a_standard_name(trace):
    from stepforge.simulator.fnlang_vocab import vocabulary

    reject("return [torch.exp(input[0])]", 1, "'exp' is not in the vocabulary", trace,
           vocabulary=vocabulary(remove=["exp"]))
    reject("return [input[0].T]", 1, "attribute 'T' is not allowed", trace, vocabulary=vocabulary(remove=["T"]))


def test_very_deep_expression(trace):
    deep = "-(" * (MAX_DEPTH + 2) + "input[0]" + ")" * (MAX_DEPTH + 2)
    reject(f"x = input[0]\nreturn [{deep}]", 2, f"nested more than {MAX_DEPTH} deep", trace)
    chain = " + ".join(["input[0]"] * 200)
    reject(f"return [{chain}]", 1, f"nested more than {MAX_DEPTH} deep", trace)
    parens = "(" * 300 + "input[0]" + ")" * 300
    with pytest.raises(FnLanguageError) as info:
        build(f"return [{parens}]")
    assert info.value.message.startswith(f"fn {FN}") and ("nested" in info.value.message or "syntax" in info.value.message)
    assert trace.clean()


def test_very_long_body(trace):
    many = "".join(f"x{i} = input[0]\n" for i in range(MAX_STATEMENTS + 5)) + "return [x0]"
    reject(many, MAX_STATEMENTS + 1, f"statements (limit {MAX_STATEMENTS})", trace)
    long_line = "x = input[0]\n" * 2 + "y = " + " + ".join(["1"] * MAX_BODY_CHARS) + "\nreturn [x]"
    reject(long_line, 3, f"characters (limit {MAX_BODY_CHARS:,})", trace)


# -- allocations past the element cap: refused before the call --------------------------------

def run_one(fn, x=None):
    x = torch.ones(16) if x is None else x
    return fn.call([x], None)


@pytest.mark.parametrize("body,vocab,construct,ran", [
    ("return [torch.zeros(10**10)[:16]]", ["zeros"], "torch.zeros would make a tensor of 10,000,000,000 elements", []),
    ("return [input[0].repeat(100000, 100000)[0, :16]]", ["repeat"], ".repeat would make a tensor", []),
    ("return [input[0].reshape(100000, 100000)[0, :16]]", [], ".reshape would make a tensor", []),
    ("return [torch.arange(2**30)[:16]]", [], "torch.arange would make a tensor", []),
    ("return [torch.nn.functional.one_hot(torch.arange(16), num_classes=2**30)[0, :16]]", [],
     "torch.one_hot would make a tensor", ["vocabulary arange"]),
    ("n = 2**20\nreturn [torch.arange(n * n)[:16]]", [], "torch.arange would make a tensor", []),
])
def test_huge_allocations_are_refused_before_the_call(body, vocab, construct, ran, trace):
    from stepforge.simulator.fnlang_vocab import vocabulary

    fn = build(body, vocabulary=vocabulary(add=vocab))
    with pytest.raises(ResourceError) as info:
        run_one(fn)
    assert info.value.message.startswith(f"fn {FN}, line "), info.value.message
    assert construct in info.value.message
    assert trace.calls == ran  # the refused call was never made


def test_one_hot_needs_num_classes(trace):
    fn = build("return [torch.nn.functional.one_hot(torch.arange(16))[0]]")
    with pytest.raises(Exception) as info:
        run_one(fn)
    assert "one_hot needs num_classes" in str(info.value)


def test_broadcast_and_products_are_bounded():
    outer = build("x = input[0]\nreturn [(x[:, None] * x[None, :]).sum(dim=0)]", max_elements=200)
    with pytest.raises(ResourceError, match=r"line 2: '\*' would make a tensor of 256 elements"):
        run_one(outer)
    mm = build("x = input[0]\nreturn [torch.outer(x, x) @ x]", max_elements=200)
    with pytest.raises(ResourceError, match="torch.outer would make a tensor of 256"):
        run_one(mm)
    ints = build("n = 2 ** 10 ** 10\nreturn [input[0]]")
    with pytest.raises(ResourceError, match="too large an integer"):
        run_one(ints)
    square = build("n = 2 ** 31\nm = n * n * n\nreturn [input[0]]")
    with pytest.raises(ResourceError, match="bits is too large"):
        run_one(square)


def test_the_cap_scales_with_the_batch_and_falls_back_per_element():
    # the 256-element product and its sum (counted as large as the product) are within the cap of 600
    # for one element, but not for 4 elements at once under vmap: the batched path refuses and the
    # per-element fallback computes the same result
    fn = build("x = input[0]\nreturn [(x[:, None] * x[None, :]).sum(dim=0)]", max_elements=600)
    xs = torch.randn(4, 16)
    out = fn.map([xs], {"D": 16})[0]
    torch.testing.assert_close(out, xs * xs.sum(dim=1, keepdim=True))
    assert fn._vmappable is False


def test_the_trace_sees_what_runs(trace):
    # controls: the spies do record a body that runs, and a direct call of a spied function
    fn = build("return [torch.exp(input[0])]")
    assert trace.clean()  # building runs nothing
    torch.testing.assert_close(run_one(fn)[0], torch.exp(torch.ones(16)))
    assert trace.calls == ["vocabulary exp"]
    torch.save(1, trace.path)
    assert not trace.clean()


def test_sizes_that_cannot_be_known_before_the_call_are_refused(trace):
    for body in ("return [torch.arange(input[0].sum() * 1e10)[:16]]",
                 "return [torch.zeros(input[0].sum())[:16]]"):
        fn = build(body, vocabulary=fnlang_vocab.vocabulary(add=["zeros"]))
        with pytest.raises(Exception, match=r"fn fn_evil, line 1: torch\.(arange|zeros): (arange takes|sizes must)"):
            run_one(fn)
        assert "vocabulary arange" not in trace.calls and "vocabulary zeros" not in trace.calls


def test_what_one_evaluation_makes_in_all_is_bounded():
    # each product alone is 16 elements, well within 100; eight of them are not
    body = "x = input[0]\n" + "".join(f"y{i} = x * {i}\n" for i in range(8)) + "return [y7]"
    with pytest.raises(ResourceError, match="line 8: the body would make 112 elements in all"):
        run_one(build(body, max_elements=100))
    torch.testing.assert_close(run_one(build(body, max_elements=200))[0], torch.full((16,), 7.0))
