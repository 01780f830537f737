"""Guardians: the rule-based affine repair (property-tested), the LLM guardian, NoGuardian, make_guardian."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from program_gen import OPS, DataChooser, assert_same_streams, fn_table, generate, run, stream

from stepforge.benchmark.schema import load_benchmark
from stepforge.loop.agents.guardians import LLMGuardian, NoGuardian, RuleGuardian, make_guardian, repair_affine
from stepforge.loop.agents.knowledge import load_knowledge
from stepforge.loop.interfaces import GuardRequest
from stepforge.serve.base import Completion, GenerationResult
from stepforge.serve.errors import PromptTooLongError
from stepforge.simulator import check_affine, parse_program
from stepforge.simulator.printer import format_program, format_statement
from stepforge.simulator.program import Apply

KNOWLEDGE = load_knowledge()
AFFINE_PROGRAMS = [KNOWLEDGE.example_map[n].impl for n, _ in KNOWLEDGE.examples()] + \
                  [t.impl for t in load_benchmark().values() if t.impl]


def copies(program: str) -> int:
    return sum(1 for s in parse_program(program).statements if isinstance(s, Apply) and s.call.op == "Copy")


def decopy(program: str) -> str:
    """Remove every Copy, feeding its source to both consumers: an affine program becomes a non-affine one."""
    while True:
        parsed = parse_program(program)
        copy = next((s for s in parsed.statements if isinstance(s, Apply) and s.call.op == "Copy"), None)
        if copy is None:
            return program
        lines = program.split("\n")
        source = copy.arg
        rest = "\n".join(lines[copy.line:])
        for target in copy.targets:  # names are fresh in these programs; `a=` keyword names are left alone
            rest = re.sub(rf"\b{re.escape(target)}\b(?!=)", source, rest)
        program = "\n".join(lines[: copy.line - 1]) + ("\n" if copy.line > 1 else "") + rest


def uses(program: str) -> dict[str, int]:
    """How often each stream is consumed (by name; the programs here never re-assign a name)."""
    count: dict[str, int] = {}
    for s in parse_program(program).statements:
        names = []
        if hasattr(s, "arg"):
            names = re.findall(r"[A-Za-z_]\w*", repr(s.arg))
            names = [n for n in names if n not in getattr(s, "loop_vars", ())]
        if hasattr(s, "names"):
            names = list(s.names)
        for n in names:
            count[n] = count.get(n, 0) + 1
    return count


# -- affine programs are returned byte for byte --------------------------------------


@pytest.mark.parametrize("program", AFFINE_PROGRAMS)
def test_affine_reference_programs_are_unchanged(program):
    result = repair_affine(program)
    assert result.program == program and not result.changed and result.copies == 0


def test_affine_text_with_odd_layout_is_byte_identical():
    text = "# c\r\nx = step.Map(fn=f).apply(E0)   # trailing\r\n\r\nreturn x"  # CRLF, no final newline
    assert repair_affine(text).program == text


def test_unparsable_programs_are_returned_unchanged():
    for text in ("import os\nreturn x\n", "", "x = step.Map(fn=f).apply(E0)\n", "return"):
        result = repair_affine(text)
        assert result.program == text and not result.changed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from(OPS))
def test_generated_affine_programs_are_unchanged(data, focus):
    g = generate(DataChooser(data), focus=focus)
    assert repair_affine(g.text).program == g.text


# -- the repair: affine afterwards, same outputs, exactly the Copies needed --------------


def test_worked_examples_of_the_guardian_prompt():
    for ex in KNOWLEDGE.guardian_examples:
        result = repair_affine(ex.before)
        assert result.program == ex.after and result.changed
        assert result.copies == copies(ex.after)


def _check_repair(broken: str, inputs, fns, binding, reference_outputs=None):
    result = repair_affine(broken)
    repaired = result.program
    assert check_affine(parse_program(repaired)) == [], repaired
    needed = sum(k - 1 for k in uses(broken).values() if k > 1)
    assert copies(repaired) - copies(broken) == needed == result.copies
    # every line of the broken program that used no repeated stream is still there, verbatim
    repeated = {n for n, k in uses(broken).items() if k > 1}
    kept = [ln for ln in broken.splitlines() if not (set(re.findall(r"[A-Za-z_]\w*", ln)) & repeated)]
    out_lines = repaired.splitlines()
    assert all(ln in out_lines for ln in kept)
    expected = reference_outputs if reference_outputs is not None else run(broken, inputs, fns, binding, "vectorised")
    got = run(repaired, inputs, fns, binding, "vectorised")
    assert_same_streams(expected, got, rtol=0, atol=0, where=repaired)
    return repaired


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from(OPS))
def test_decopied_generated_programs_are_repaired(data, focus):
    g = generate(DataChooser(data), focus=focus)
    broken = decopy(g.text)
    fns = g.fns()
    original = run(g.text, g.inputs, fns, g.binding, "vectorised")
    if broken == g.text:
        assert repair_affine(broken).program == broken
        return
    assert check_affine(parse_program(broken))
    repaired = _check_repair(broken, g.inputs, fns, g.binding, reference_outputs=original)
    assert copies(repaired) == copies(g.text)


@pytest.mark.parametrize("name", [n for n, _ in KNOWLEDGE.examples()])
def test_decopied_knowledge_examples_are_repaired_and_verify(name):
    from stepforge.benchmark.verifier import verify

    task = KNOWLEDGE.example_map[name].task
    broken = decopy(task.impl)
    repaired = repair_affine(broken).program
    assert copies(repaired) == copies(task.impl)
    verdict = verify(task, repaired, seeds=(0,))
    assert verdict.passed, verdict.short()


# A small task where every stream may be reused any number of times.
BINDING = {"M": 3, "N": 2, "K": 4, "D": 2, "E": 2}
FNS = fn_table(BINDING, [
    ("neg", "fp32", "fp32", "[-input[0]]", None),
    ("add", ["fp32", "fp32"], "fp32", "[input[0] + 2.0 * input[1]]", None),
    ("total", "fp32", "fp32", "[state[0] + input[0]]", [0]),
])


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {f"E{i}": stream("fp32", ["K", "M"], torch.randn(3, 4, generator=g)) for i in range(2)}


@st.composite
def reusing_programs(draw):
    streams = ["E0", "E1"]
    lines = []
    for i in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["neg", "add", "scan", "zip"]))
        a = draw(st.sampled_from(streams))
        b = draw(st.sampled_from(streams))
        name = f"s{i}"
        if kind == "neg":
            lines.append(f"{name} = step.Map(fn=neg).apply({a})")
        elif kind == "add":
            lines.append(f"{name} = step.Map(fn=add).apply(({a}, {b}))")
        elif kind == "scan":
            lines.append(f"{name} = step.Scan(fn=total, b=1).apply({a})")
        else:
            lines.append(f"{name}_z = step.Zip().apply(({a}, {b}))  # zipped")
            lines.append(f"{name} = step.Map(fn=add).apply({name}_z)")
        streams.append(name)
        if draw(st.booleans()):
            lines.append(f"# after {name}")
    outs = draw(st.lists(st.sampled_from(streams), min_size=1, max_size=3))
    lines.append("return " + ", ".join(outs))
    return "\n".join(lines) + "\n"


@settings(max_examples=80, deadline=None)
@given(reusing_programs(), st.integers(0, 3))
def test_programs_that_reuse_streams_and_inputs_are_repaired(program, seed):
    inputs = _inputs(seed)
    if not check_affine(parse_program(program)):
        assert repair_affine(program).program == program
        return
    _check_repair(program, inputs, FNS, BINDING)


def test_three_uses_get_a_chain_of_two_copies_and_the_top_for_inputs():
    program = "# header\na = step.Map(fn=neg).apply(E0)\nb = step.Map(fn=add).apply((E0, E0))\nreturn a, b\n"
    repaired = repair_affine(program).program
    assert repaired == ("E0_0, E0_t = step.Copy().apply(E0)\nE0_1, E0_2 = step.Copy().apply(E0_t)\n# header\n"
                        "a = step.Map(fn=neg).apply(E0_0)\nb = step.Map(fn=add).apply((E0_1, E0_2))\nreturn a, b\n")
    assert_same_streams(run(program, _inputs(0), FNS, BINDING, "vectorised"),
                        run(repaired, _inputs(0), FNS, BINDING, "vectorised"), rtol=0, atol=0)


def test_fresh_names_avoid_every_name_in_the_program():
    program = "x_0 = step.Map(fn=neg).apply(E1)\nx = step.Map(fn=neg).apply(E0)\ny = step.Map(fn=add).apply((x, x))\nreturn y, x_0\n"
    repaired = repair_affine(program).program
    assert "x_c_0, x_c_1 = step.Copy().apply(x)" in repaired
    _check_repair(program, _inputs(1), FNS, BINDING)


def test_a_reassigned_name_is_a_new_stream():
    program = ("x = step.Map(fn=neg).apply(E0)\ny = step.Map(fn=add).apply((x, x))\n"
               "x = step.Map(fn=neg).apply(y)\nz = step.Map(fn=add).apply((x, x))\nreturn z\n")
    result = repair_affine(program)
    assert result.copies == 2 and check_affine(parse_program(result.program)) == []
    assert result.program == ("x = step.Map(fn=neg).apply(E0)\nx_0, x_1 = step.Copy().apply(x)\n"
                              "y = step.Map(fn=add).apply((x_0, x_1))\nx = step.Map(fn=neg).apply(y)\n"
                              "x_c_0, x_c_1 = step.Copy().apply(x)\nz = step.Map(fn=add).apply((x_c_0, x_c_1))\n"
                              "return z\n")
    assert_same_streams(run(program, _inputs(2), FNS, BINDING, "vectorised"),
                        run(result.program, _inputs(2), FNS, BINDING, "vectorised"), rtol=0, atol=0)


def test_multiline_statements_and_semicolons():
    program = "x = step.Map(\n    fn=neg,\n).apply(E0)\ny = step.Map(fn=add).apply((x,\n    x))\nreturn y\n"
    repaired = _check_repair(program, _inputs(0), FNS, BINDING)
    assert repaired.startswith("x = step.Map(\n    fn=neg,\n).apply(E0)\nx_0, x_1 = step.Copy().apply(x)\n")
    program = "x = step.Map(fn=neg).apply(E0); y = step.Map(fn=add).apply((x, x))\nreturn y, E0\n"
    _check_repair(program, _inputs(0), FNS, BINDING)


def test_what_cannot_be_copied_is_left_and_reported():
    body = ("parts = step.Partition(N=2).apply((E0, E1))\n"
            "outs = [step.Map(fn=add).apply((p, E0)) for p in parts]\nreturn outs\n")
    result = repair_affine(body)
    assert any("comprehension" in u for u in result.unfixable)
    lists = ("parts = step.Partition(N=2).apply((E0, E1))\n"
             "a = [step.Map(fn=neg).apply(p) for p in parts]\nb = [step.Map(fn=neg).apply(p) for p in parts]\n"
             "return a\n")
    result = repair_affine(lists)
    assert result.program == lists and not result.changed
    assert any("list of streams" in u for u in result.unfixable)


def test_the_printer_reads_back_to_the_same_program():
    for program in AFFINE_PROGRAMS:
        parsed = parse_program(program)
        printed = format_program(parsed)
        assert printed == program  # the references are written in the printer's layout
        assert [format_statement(s) for s in parse_program(printed).statements] == printed.splitlines()
    odd = "a, = step.Copy().apply(x)\ny = step.Flatten(L=(1,)).apply(((a,), b))\nreturn y\n"
    assert format_program(parse_program(odd)) == "a, = step.Copy().apply(x)\ny = step.Flatten(L=[1]).apply(((a,), b))\nreturn y\n"


# -- the guardian classes ---------------------------------------------------------------


def _req(program: str, **kw) -> GuardRequest:
    return GuardRequest(task_key="knowledge/kb_repeat", task=KNOWLEDGE.example_map["kb_repeat"].task,
                        program=program, **kw)


BROKEN = KNOWLEDGE.guardian_examples[1].before
FIXED = KNOWLEDGE.guardian_examples[1].after


def test_rule_and_no_guardian():
    rule = make_guardian("rule")
    assert isinstance(rule, RuleGuardian)
    out = rule.repair([_req(BROKEN), _req(FIXED), _req("garbage(")])
    assert [(r.program, r.changed) for r in out] == [(FIXED, True), (FIXED, False), ("garbage(", False)]
    none = make_guardian("none")
    assert isinstance(none, NoGuardian)
    assert [(r.program, r.changed) for r in none.repair([_req(BROKEN)])] == [(BROKEN, False)]
    with pytest.raises(ValueError):
        make_guardian("llm")
    with pytest.raises(ValueError):
        make_guardian("oracle")


class ScriptedBackend:
    """A backend that answers each request with `reply(request)` and records what it was sent."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            text = self.reply(r)
            if isinstance(text, Exception):
                raise text
            out.append(GenerationResult(request_id=r.request_id, prompt_tokens=100 + len(r.messages[-1]["content"]) // 10,
                                        completions=[Completion(text=text, finish_reason="stop", completion_tokens=7)]
                                        * r.sampling.n))
        return out


def test_llm_guardian_takes_the_program_from_the_reply():
    backend = ScriptedBackend(lambda r: f"The repaired program:\n```python\n{FIXED}```\n")
    guardian = make_guardian("llm", backend, max_tokens=99)
    assert isinstance(guardian, LLMGuardian)
    (res,) = guardian.repair([_req(BROKEN, temperature=0.3, seed=5)])
    assert res.program == FIXED and res.changed
    assert res.completion_tokens == 7 and res.prompt_tokens > 100
    (sent,) = backend.calls[0]
    assert sent.sampling.n == 1 and sent.sampling.max_tokens == 99
    assert sent.sampling.temperature == 0.3 and sent.sampling.seed == 5
    assert res.messages == sent.messages
    assert BROKEN.strip() in sent.messages[-1]["content"]
    assert "consumed at most once" in sent.messages[0]["content"]


def test_llm_guardian_keeps_the_original_when_the_reply_is_unusable():
    backend = ScriptedBackend(lambda r: "Sorry, I cannot help with that.")
    guardian = LLMGuardian(backend, temperature=0.0)
    (res,) = guardian.repair([_req(BROKEN, temperature=0.9)])
    assert res.program == BROKEN and not res.changed
    assert backend.calls[0][0].sampling.temperature == 0.0
    assert "no STeP statements" in guardian.last_reasons[0]


def test_llm_guardian_may_corrupt_and_reports_it():
    corrupt = FIXED.replace("fn_sub", "fn_add", 1)
    guardian = LLMGuardian(ScriptedBackend(lambda r: f"```python\n{corrupt}```"))
    (res,) = guardian.repair([_req(FIXED)])
    assert res.program == corrupt and res.changed
    same = LLMGuardian(ScriptedBackend(lambda r: f"```python\n{FIXED}\n\n```"))
    (res,) = same.repair([_req(FIXED)])
    assert res.program == FIXED and not res.changed


def test_llm_guardian_only_violations_and_request_errors():
    backend = ScriptedBackend(lambda r: PromptTooLongError("too long") if "E0_0" not in FIXED else f"```\n{FIXED}```")
    guardian = LLMGuardian(backend, only_violations=True)
    out = guardian.repair([_req(FIXED), _req(BROKEN), _req("nope(")])
    assert [r.program for r in out] == [FIXED, FIXED, "nope("]
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 1  # only the broken program was sent
    failing = LLMGuardian(ScriptedBackend(lambda r: PromptTooLongError("the prompt has 9000 tokens")))
    (res,) = failing.repair([_req(BROKEN)])
    assert res.program == BROKEN and not res.changed and "PromptTooLongError" in failing.last_reasons[0]


def test_llm_guardian_through_the_transformers_backend(hf_backend):
    """The real path: chat template, generation and counting on the tiny Qwen2 model."""
    guardian = LLMGuardian(hf_backend, max_tokens=8, temperature=0.0)
    (res,) = guardian.repair([_req(BROKEN)])
    assert res.prompt_tokens > 300 and 0 < res.completion_tokens <= 8
    assert res.messages and res.messages[0]["role"] == "system"
    assert res.program == BROKEN or parse_program(res.program)  # a random model's reply is garbage: kept
