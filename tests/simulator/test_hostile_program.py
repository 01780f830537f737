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


# ---------------------------------------------------------------------------
# memory: liveness, the live-element cap, peak RSS

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402
from program_gen import fn_table, run, stream  # noqa: E402

from stepforge.simulator import ResourceError  # noqa: E402
from stepforge.simulator.interpreter import liveness  # noqa: E402
from stepforge.simulator.naive import NaiveEngine  # noqa: E402
from stepforge.simulator.vectorised import VectorisedEngine  # noqa: E402

SIZES = {"M": 2, "N": 3, "K": 4, "D": 2}
FNS = [("f", "fp32", "fp32", "[input[0] + 1.0]"), ("add", "fp32", "fp32", "[state[0] + input[0]]", 0)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {"E0": stream("fp32", ["K", "M"], torch.rand(2, 4, generator=gen)),
            "E1": stream("fp32", ["K", "M"], torch.rand(2, 4, generator=gen))}


def test_liveness_drops_each_value_after_its_last_use():
    program = parse_program(
        "a = step.Map(fn=f).apply(E0)\n"      # 0: E0 last read here
        "dead = step.Map(fn=f).apply(a)\n"    # 1: dead is never read
        "a = step.Map(fn=f).apply(a)\n"       # 2: re-assigned; the old a dies here, the new one lives on
        "FS = [f, f]\n"                        # 3
        "YS = [step.Map(fn=g).apply(a) for g in FS]\n"  # 4: a and FS last read here
        "x, y = step.Copy().apply(a)\n"        # 5 (a re-read: affine is not liveness's business)
        "return x")
    unread, drops = liveness(program, ["E0", "E1"])
    assert unread == {"E1"}
    assert drops == [{"E0"}, {"dead"}, set(), set(), {"FS", "YS"}, {"a", "y"}, {"x"}]


@pytest.mark.parametrize("engine_cls", [VectorisedEngine, NaiveEngine])
def test_engines_free_dead_and_consumed_streams(engine_cls, monkeypatch):
    """Outputs of earlier statements are garbage once dead: at most a few are alive at any time."""
    alive_counts, refs = [], []
    real = engine_cls.execute

    def spy(self, op, arg, binding):
        out = real(self, op, arg, binding)
        alive_counts.append(sum(r() is not None for r in refs))
        tensors = [t for t in _leaves(out)]
        refs.extend(weakref.ref(t) for t in tensors)
        return out

    monkeypatch.setattr(engine_cls, "execute", spy)
    engine = "vectorised" if engine_cls is VectorisedEngine else "naive"
    body = "".join(f"d{i} = step.Map(fn=f).apply(E0)\n" for i in range(30))  # dead streams
    body += "a0 = step.Map(fn=f).apply(E1)\n" + "".join(f"a{i + 1} = step.Map(fn=f).apply(a{i})\n" for i in range(30))
    out = run(body + "return a30", _inputs(), fn_table(SIZES, FNS), SIZES, engine)
    assert torch.allclose(out[0].data, _inputs()["E1"].data + 31.0)  # it ran to the end
    per_stream = max(1, len(refs) // 61)
    assert max(alive_counts) <= 2 * per_stream, alive_counts


def _leaves(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)


def test_results_are_unchanged_by_freeing():
    text = ("a, b = step.Copy().apply(E0)\nc = step.Map(fn=f).apply(a)\nd = step.Zip().apply((c, b))\n"
            "e = step.Map(fn=f).apply(E1)\nf2 = step.Accum(fn=add, b=1).apply(e)\nreturn f2")
    inputs = _inputs()
    got = run(text, inputs, fn_table(SIZES, FNS), SIZES, "vectorised")[0].data
    assert torch.allclose(got, (inputs["E1"].data + 1.0).sum(-1))


def _no_execute(monkeypatch):
    def spy(self, *a, **k):
        raise AssertionError("an operator ran although the live streams are over the budget")

    monkeypatch.setattr(VectorisedEngine, "execute", spy)
    monkeypatch.setattr(NaiveEngine, "execute", spy)


@pytest.mark.parametrize("n_items", [3, 50, 299])
def test_a_comprehension_of_many_big_items_is_a_resource_error_before_running(n_items, monkeypatch):
    _no_execute(monkeypatch)
    fns_list = ", ".join(["f"] * n_items)
    text = f"R = step.Repeat(n=1000).apply(E0)\nYS = [step.Map(fn=g).apply(R) for g in [{fns_list}]]\nreturn E1"
    with pytest.raises(ResourceError) as err:
        run(text, _inputs(), fn_table(SIZES, FNS), SIZES, "vectorised", max_elements=10_000)
    assert err.value.line == 2 and "alive at this statement" in err.value.message
    assert "limit 20,000" in err.value.message


def test_live_cap_counts_only_live_streams():
    """A long chain whose streams together are far over the cap passes: each dies after its next use."""
    text = "a0 = step.Repeat(n=1000).apply(E0)\n" + "".join(
        f"a{i + 1} = step.Map(fn=f).apply(a{i})\n" for i in range(100)) + "s = step.Accum(fn=add, b=1).apply(a100)\nreturn s"
    out = run(text, _inputs(), fn_table(SIZES, FNS), SIZES, "vectorised", max_elements=8_000, max_live_elements=16_200)
    assert torch.allclose(out[0].data, (_inputs()["E0"].data + 100.0).unsqueeze(-1).expand(2, 4, 1000).sum(-1), rtol=1e-4)
    with pytest.raises(ResourceError, match="line 2: the streams alive"):
        run(text, _inputs(), fn_table(SIZES, FNS), SIZES, "vectorised", max_elements=8_000, max_live_elements=15_000)


def test_copy_halves_count_while_alive(monkeypatch):
    text = "R = step.Repeat(n=1000).apply(E0)\nx, y = step.Copy().apply(R)\nz = step.Map(fn=f).apply(x)\nreturn z"
    # line 2: R (8,000) is alive while its two halves (8,000 each) are made; E0 and the unread E1 are gone
    out = run(text, _inputs(), fn_table(SIZES, FNS), SIZES, "vectorised", max_elements=8_000, max_live_elements=24_000)
    assert out[0].data.shape == (2, 4, 1000)
    _no_execute(monkeypatch)
    with pytest.raises(ResourceError, match="line 2: .* 24,000 elements together .limit 23,999"):
        run(text, _inputs(), fn_table(SIZES, FNS), SIZES, "vectorised", max_elements=8_000, max_live_elements=23_999)


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from stepforge.benchmark.verifier import verify
    verify("norm/G_0_8_01", seeds=(0,), bindings=[{}])  # warm: imports, the task's inputs and oracle
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    program = sys.stdin.read()
    v = verify("norm/G_0_8_01", program, seeds=(0,), bindings=[{}], check_affine=False, max_elements=2**22)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(v.stage, (peak - base) // 1024)
""")


@pytest.mark.parametrize("program", [
    # 100 dead Maps of one big Repeat: 14.7 MB each; before liveness all stayed alive (about 2.2 GB)
    "R = step.Repeat(n=32768).apply(E0)\n" + "".join(f"A{i} = step.Map(fn=fn_square).apply(R)\n" for i in range(100))
    + "return E0",
    # the same as one list comprehension: a resource error before anything is allocated
    "R = step.Repeat(n=32768).apply(E0)\nYS = [step.Map(fn=g).apply(R) for g in [" + ", ".join(["fn_square"] * 100)
    + "]]\nreturn E0",
])
def test_peak_memory_of_dead_streams_stays_bounded(program):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], input=program, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stage, grown_mb = proc.stdout.split()
    assert stage in ("value", "resource")
    assert int(grown_mb) < 400, f"peak RSS grew by {grown_mb} MB"
