"""The verifier rejects each kind of wrong program at the right stage (mutations of reference solutions)."""

from __future__ import annotations

import re
import time

import pytest
from support import BLOW_UP, added_task_keys

from stepforge import simulator as sim
from stepforge.benchmark.schema import TaskFileError, load_benchmark
from stepforge.benchmark.verifier import Verdict, verify
from stepforge.simulator import interpreter

TASKS = load_benchmark()


def edit(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the reference"
    return text.replace(old, new)


def with_fn(task, func_name: str, apply: str):
    fns = [f.model_copy(update={"apply": apply}) if f.func_name == func_name else f for f in task.fns]
    assert fns != task.fns
    return task.model_copy(update={"fns": fns})


def ref(key: str) -> str:
    return TASKS[key].impl


def check(verdict: Verdict, stage: str, *, functional_ok=False, affine_ok=True):
    assert not verdict.passed
    assert verdict.stage == stage, verdict.message
    assert verdict.functional_ok is functional_ok
    if affine_ok is not None:
        assert verdict.affine_ok is affine_ok
    assert "\n" not in verdict.message and verdict.message


# -- parse ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutation", [
    ("S0 = step.Flatten(L=[2]).apply(streamed)", "S0 = step.Flatten(L=[2]).apply(streamed"),  # syntax
    ("pairs = step.Zip()", "import os\npairs = step.Zip()"),                                  # not STeP
    ("return S0", "S0.data = 1\nreturn S0"),                                                   # attribute
    ("return S0", ""),                                                                          # no return
])
def test_parse_stage(mutation):
    verdict = verify(TASKS["gemm/G_0_7_01"], edit(ref("gemm/G_0_7_01"), *mutation))
    check(verdict, "parse", affine_ok=None)
    assert verdict.message.startswith("line ") or "return" in verdict.message
    assert verdict.runs == 0


# -- type -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,mutation", [
    # a fn whose input type does not match the stream
    ("attention/G_0_6_01", ("step.Map(fn=fn_drop_max).apply(scanned)", "step.Map(fn=fn_normalise).apply(scanned)")),
    # zip of streams of different shapes
    ("gemm/G_0_6_02", ("step.Zip().apply((E0, broadcast))", "step.Zip().apply((E0, E1))")),
    # a changed Repeat count no longer lines the operands up
    ("norm/G_0_16_01", ("step.Repeat(n=D).apply(mean_b)", "step.Repeat(n=N).apply(mean_b)")),
    # an unknown fn and an unknown stream
    ("bmm/bmm_0", ("fn=fn_outer", "fn=fn_inner")),
    ("bmm/bmm_0", ("apply((a, b))", "apply((a, c))")),
    # folding over more dims than the stream has
    ("rope/G_0_3_02", ("step.Scan(fn=fn_position, b=1)", "step.Scan(fn=fn_position, b=3)")),
])
def test_type_stage(key, mutation):
    verdict = verify(TASKS[key], edit(ref(key), *mutation))
    check(verdict, "type", affine_ok=None)
    assert verdict.message.startswith("line ")


# -- affine -----------------------------------------------------------------------------------


def test_missing_copy_is_affine_but_functionally_correct():
    key = "norm/G_0_8_01"
    impl = edit(edit(edit(ref(key), "x_a, x_b = step.Copy().apply(E0)\n", ""),
                     "apply(x_a)", "apply(E0)"), "(x_b, rms_rep)", "(E0, rms_rep)")
    verdict = verify(TASKS[key], impl)
    check(verdict, "affine", functional_ok=True, affine_ok=False)
    assert "E0" in verdict.message and "consumed 2 times" in verdict.message
    assert verdict.runs == 9  # the numbers were still checked at every binding and seed

    lenient = verify(TASKS[key], impl, check_affine=False)
    assert lenient.passed and lenient.stage == "ok"
    assert lenient.affine_ok is False and "affine" in lenient.message


def test_affine_and_wrong_values_reports_affine_with_functional_failure():
    key = "norm/G_0_16_01"
    impl = edit(ref(key), "x_b, x_c = step.Copy().apply(x_rest)\n", "")
    impl = edit(edit(impl, "apply(x_b)", "apply(x_rest)"), "(x_c, mean_rep)", "(x_rest, mean_rep)")
    impl = edit(impl, "step.Map(fn=fn_sqrt).apply(shifted)", "step.Map(fn=fn_square).apply(shifted)")
    verdict = verify(TASKS[key], impl)
    check(verdict, "affine", functional_ok=False, affine_ok=False)
    assert "x_rest" in verdict.message and "value" in verdict.message


def test_affine_also_counts_a_stream_returned_and_consumed():
    key = "gemm/G_0_6_02"
    impl = edit(ref(key), "return S0", "return S0, products")
    verdict = verify(TASKS[key], impl)
    check(verdict, "affine", affine_ok=False)
    assert "products" in verdict.message and "arity" in verdict.message


# -- arity, dtype, shape ----------------------------------------------------------------------


def test_arity_stage():
    key = "attention/G_0_9_01"
    impl = edit(ref(key), "return S0", "S0_a, S0_b = step.Copy().apply(S0)\nreturn S0_a, S0_b")
    verdict = verify(TASKS[key], impl)
    check(verdict, "arity")
    assert "returns 2" in verdict.message and "expects 1" in verdict.message


def test_dtype_stage_before_shape():
    key = "attention/G_0_4_01"  # returning the Buffer stream before Streamify: wrong dtype and shape
    impl = edit(edit(ref(key), "S0 = step.Streamify().apply(rows)\n", ""), "return S0", "return rows")
    verdict = verify(TASKS[key], impl)
    check(verdict, "dtype")
    assert "Buffer(fp32, [D])" in verdict.message and "expected fp32" in verdict.message


@pytest.mark.parametrize("key,mutation,expected", [
    ("gemm/G_0_7_01", ("S0 = step.Flatten(L=[2]).apply(streamed)\nreturn S0", "return streamed"), "[N, M, 1]"),
    ("gemm/G_0_6_02", ("S0 = step.Accum(fn=fn_add, b=1).apply(products)", "S0 = step.Scan(fn=fn_add, b=1).apply(products)"),
     "[K, M, N]"),
])
def test_shape_stage(key, mutation, expected):
    verdict = verify(TASKS[key], edit(ref(key), *mutation))
    check(verdict, "shape")
    assert expected in verdict.message and "expected [" in verdict.message


def test_literal_size_where_a_symbol_is_meant_is_caught_statically():
    # Repeat(n=16) is right only while D = 16; symbolically [16, N] is not [D, N]
    key = "norm/G_0_16_01"
    verdict = verify(TASKS[key], edit(ref(key), "step.Repeat(n=D).apply(mean_b)", "step.Repeat(n=16).apply(mean_b)"))
    check(verdict, "type")
    assert "[16, N]" in verdict.message and "[D, N]" in verdict.message


# -- value ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,edits", [
    # a fn swapped for another of the same type
    ("norm/G_0_16_01", [("step.Map(fn=fn_sqrt).apply(shifted)", "step.Map(fn=fn_square).apply(shifted)")]),
    ("norm/G_0_16_01", [("step.Map(fn=fn_div_d).apply(total)", "step.Map(fn=fn_sqrt).apply(total)")]),
    ("norm/G_0_9_02", [("step.Map(fn=fn_sqrt).apply(shifted)", "step.Map(fn=fn_square).apply(shifted)")]),
    # the epsilon dropped: a relative change of about 1.5e-5
    ("norm/G_0_8_01", [("shifted = step.Map(fn=fn_add_eps).apply(mean_sq)\n", ""),
                       ("apply(shifted)", "apply(mean_sq)")]),
])
def test_value_stage(key, edits):
    impl = ref(key)
    for old, new in edits:
        impl = edit(impl, old, new)
    verdict = verify(TASKS[key], impl)
    check(verdict, "value")
    assert "S0" in verdict.message and "worst at" in verdict.message and "seed" in verdict.message
    assert verdict.binding is not None and verdict.seed is not None


@pytest.mark.parametrize("key,func_name,apply", [
    # the rescale factor dropped from the projection: right only while the running max never changes
    ("attention/G_0_6_01", "fn_drop_max", "return [input[1], torch.ones_like(input[2])]\n"),
    # positions that step by 2
    ("rope/G_0_3_02", "fn_position", "return [state[0] + 2 * input[0]]\n"),
    # a multiply turned into an add (same types)
    ("bmm/bmm_2", "fn_mul", "return [input[0] + input[1]]\n"),
])
def test_value_stage_for_a_fn_of_the_same_type_with_other_numbers(key, func_name, apply):
    wrong = with_fn(TASKS[key], func_name, apply)
    verdict = verify(wrong, ref(key))
    check(verdict, "value")


def test_equivalent_rewrite_passes():
    key = "gemm/G_0_6_02"  # the multiply is commutative: zipping the other way round is still right
    impl = edit(ref(key), "step.Zip().apply((E0, broadcast))", "step.Zip().apply((broadcast, E0))")
    assert verify(TASKS[key], impl).passed


# -- runtime and resource ---------------------------------------------------------------------


def test_fn_that_raises_is_a_runtime_verdict():
    task = with_fn(TASKS["norm/G_0_8_01"], "fn_sqrt", "if input[0].numel() > 0:\n    raise ValueError('boom')\nreturn [input[0]]\n")
    verdict = verify(task, task.impl)
    check(verdict, "runtime")
    assert "fn_sqrt" in verdict.message and "boom" in verdict.message




def test_oversized_program_is_a_resource_verdict_before_allocating():
    t0 = time.perf_counter()
    verdict = verify(TASKS["rope/G_0_3_02"], BLOW_UP)  # 35 * 2**25 elements: over 2**30
    check(verdict, "resource")
    assert "limit" in verdict.message and "134,217,728" in verdict.message
    assert time.perf_counter() - t0 < 5.0
    small = verify(TASKS["rope/G_0_3_02"], BLOW_UP.replace("33554432", "3"), bindings=[{}], seeds=(0,))
    check(small, "value")  # the same program, small enough to run, is simply wrong


# -- bookkeeping ------------------------------------------------------------------------------


def test_static_stages_run_once_per_program(monkeypatch):
    """Parsed and affine-checked once, type-checked once per size binding (not per seed)."""
    calls = {"parse": 0, "typecheck": 0, "affine": 0}
    real = {"parse": sim.parse_program, "typecheck": interpreter.typecheck_program, "affine": sim.check_affine}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return wrapper

    monkeypatch.setattr(sim, "parse_program", counting("parse"))
    monkeypatch.setattr(interpreter, "typecheck_program", counting("typecheck"))
    monkeypatch.setattr(sim, "check_affine", counting("affine"))
    task = TASKS["bmm/bmm_1"]
    n_bindings = 1 + len(task.bindings)
    for _ in range(2):  # the second time with every input and oracle cached
        verdict = verify(task, seeds=(0, 1, 2, 3))
        assert verdict.passed and verdict.runs == 4 * n_bindings
    assert calls == {"parse": 2, "typecheck": 2 * n_bindings, "affine": 2}


def test_verdict_fields_and_timings():
    verdict = verify(TASKS["rope/G_0_4_01"])
    assert verdict.task == "rope/G_0_4_01"
    assert set(verdict.timings) >= {"parse", "run", "check", "total"}
    assert verdict.timings["total"] >= verdict.timings["run"] > 0
    again = Verdict.model_validate_json(verdict.model_dump_json())
    assert again == verdict


def test_a_broken_task_raises_instead_of_blaming_the_program():
    task = TASKS["gemm/G_0_6_02"]
    outputs = [task.outputs[0].model_copy(update={"data_transform": "input_data['E0'].sum(0)\n"})]
    wrong_shape = task.model_copy(update={"outputs": outputs})
    with pytest.raises(TaskFileError, match="oracle of S0 has shape"):
        verify(wrong_shape)
    outputs = [task.outputs[0].model_copy(update={"data_transform": "undefined_name\n"})]
    with pytest.raises(TaskFileError, match=r"outputs\[0\].data_transform\[0\]: raised NameError"):
        verify(task.model_copy(update={"outputs": outputs}))
    bad_binding = task.model_copy(update={"global_code": "ctx[D] = 16\n", "bindings": [{"D": 8}]})
    with pytest.raises(TaskFileError, match="global sets D=16"):
        verify(bad_binding)


def test_random_program_mutations_always_get_a_verdict():
    """Token-level mutations of every reference: verify returns a verdict, never raises, and only
    programs that are still correct at every binding pass."""
    import random

    from mutations import mutations

    rng = random.Random(7)
    seen_stages = set()
    for _key, task in TASKS.items():
        for impl in mutations(task.impl, rng, 6):
            verdict = verify(task, impl, seeds=(0,), bindings=[{}])
            seen_stages.add(verdict.stage)
            if verdict.passed:  # an equivalent program (e.g. a repeated fn list): right at every binding too
                assert verify(task, impl, seeds=(1,)).passed
    assert {"parse", "type", "affine"} <= seen_stages


# -- the added tasks: every mutation of the reference is rejected ------------------------------

_COPY = re.compile(r"^(\w+), (\w+) = step\.Copy\(\)\.apply\((\w+)\)$")


def _fn_swaps(task):
    """The reference with one fn use replaced by another fn of the same signature (and fold-ness)."""
    def signature(fn):
        return (str(fn.input_dtype), str(fn.output_dtype), fn.init is None)

    for fn in task.fns:
        for other in task.fns:
            if other.func_name != fn.func_name and signature(other) == signature(fn):
                for match in re.finditer(rf"\b{fn.func_name}\b", task.impl):
                    yield task.impl[:match.start()] + other.func_name + task.impl[match.end():]


def _fn_list_rotations(task):
    """The reference with a list of expert fns rotated by one place."""
    for match in re.finditer(r"= \[(fn_\w+(?:, fn_\w+)+)\]", task.impl):
        names = match.group(1).split(", ")
        rotated = ", ".join(names[1:] + names[:1])
        yield task.impl[:match.start(1)] + rotated + task.impl[match.end(1):]


def _copies_removed(task):
    """The reference with one Copy dropped and both of its results read from the copied stream."""
    lines = task.impl.splitlines()
    for i, line in enumerate(lines):
        match = _COPY.match(line)
        if match:
            a, b, source = match.groups()
            rest = [re.sub(rf"\b({a}|{b})\b", source, later) for later in lines[i + 1:]]
            yield "\n".join(lines[:i] + rest) + "\n"


def _statements_dropped(task):
    lines = task.impl.splitlines()
    for i in range(len(lines) - 1):
        yield "\n".join(lines[:i] + lines[i + 1:]) + "\n"


def _sizes_changed(task):
    """The reference with one size keyword given another size symbol or a literal."""
    for match in re.finditer(r"\b(n|S|N)=(\w+)", task.impl):
        for other in {"M", "N", "K", "D", "2"} - {match.group(2)}:
            yield task.impl[:match.start(2)] + other + task.impl[match.end(2):]


def _arguments_rotated(task):
    """The reference with the streams of one tuple argument rotated by one place (not the two results
    of one Copy, which hold the same values)."""
    copies = [set(m.groups()[:2]) for m in map(_COPY.match, task.impl.splitlines()) if m]
    for match in re.finditer(r"\.apply\(\((\w+(?:, \w+)+)\)\)", task.impl):
        names = match.group(1).split(", ")
        if set(names) in copies:
            continue
        rotated = ", ".join(names[1:] + names[:1])
        yield task.impl[:match.start(1)] + rotated + task.impl[match.end(1):]


def _levels_changed(task):
    """The reference with one level keyword (a=, b=, L=) one higher or one lower."""
    for match in re.finditer(r"\b(a|b|L)=\[?(\d+)", task.impl):
        value = int(match.group(2))
        for other in {value - 1, value + 1} - {-1}:
            yield task.impl[:match.start(2)] + str(other) + task.impl[match.end(2):]


ADDED = added_task_keys(TASKS)


@pytest.mark.parametrize("key", ADDED)
def test_every_mutation_of_an_added_task_is_rejected(key):
    task = TASKS[key]
    counts = {}
    for kind, mutants in (("fn swap", _fn_swaps(task)), ("fn list", _fn_list_rotations(task)),
                          ("copy", _copies_removed(task)), ("drop", _statements_dropped(task)),
                          ("size", _sizes_changed(task)), ("level", _levels_changed(task))):
        for impl in mutants:
            assert impl != task.impl
            verdict = verify(task, impl, seeds=(0, 1))
            assert not verdict.passed, f"{kind} mutation passed:\n{impl}"
            if kind == "copy":
                assert verdict.stage == "affine" and verdict.affine_ok is False, verdict.message
            counts[kind] = counts.get(kind, 0) + 1
    assert counts.get("drop", 0) == len(task.impl.splitlines()) - 1


@pytest.mark.parametrize("key", ADDED)
def test_rotated_arguments_of_an_added_task_are_rejected_or_equivalent(key):
    """Rotating the streams of a tuple argument is wrong unless the fn is symmetric in them (a product,
    a sum): then the program must be right at every binding and seed."""
    task = TASKS[key]
    for impl in _arguments_rotated(task):
        verdict = verify(task, impl, seeds=(0,), bindings=[{}])
        if verdict.passed:
            assert verify(task, impl, seeds=(1, 2, 3)).passed, impl
