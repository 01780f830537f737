"""Lenient reply parsing: every shape a model answers in, and never an exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepforge.loop.agents.knowledge import load_knowledge
from stepforge.loop.agents.replies import extract_program, extract_program_with_reason
from stepforge.simulator import parse_program
from stepforge.simulator.printer import format_program

P = "x = step.Map(fn=fn_a).apply(E0)\nreturn x\n"
Q = "y = step.Map(fn=fn_b).apply(E0)\nreturn y\n"
INDENTED = "".join("    " + line + "\n" for line in P.splitlines())

CASES = {
    "bare": (P, "bare"),
    "python_fence": (f"Here you go:\n```python\n{P}```\nThis maps E0 with fn_a.", "fence"),
    "plain_fence": (f"```\n{P}```", "fence"),
    "tilde_fence": (f"~~~py\n{P}~~~\n", "fence"),
    "unclosed_fence": (f"The program:\n```python\n{P}", "fence"),
    "yaml_fence": ("```yaml\nimpl: |\n  x = step.Map(fn=fn_a).apply(E0)\n  return x\n```", "yaml"),
    "yaml_bare": ("impl: |\n  x = step.Map(fn=fn_a).apply(E0)\n  return x\n", "yaml"),
    "yaml_whole_task": ("```yaml\ntest_name: t\ninputs:\n  - name: E0\nimpl: |\n"
                        "  x = step.Map(fn=fn_a).apply(E0)\n  return x\n```", "yaml"),
    "yaml_broken_elsewhere": ("impl: |\n  x = step.Map(fn=fn_a).apply(E0)\n  return x\nnotes: [unclosed\n", "yaml"),
    "prose_around": (f"Sure! First we map.\n\n{P}\nThat is all: it maps E0.", "salvaged"),
    "indented_bare": (INDENTED, "bare"),
    "function_wrapper": (f"```python\ndef impl(E0, E1):\n    \"\"\"The program.\"\"\"\n{INDENTED}```", "function"),
    "function_multiline_signature": (f"def impl(\n    E0,\n    E1,\n):\n{INDENTED}", "function"),
    "function_in_prose": (f"I would write:\n\ndef program(E0):\n{INDENTED}\nHope it helps.", "function"),
    "think_then_answer": (f"<think>Maybe\n```python\n{Q}```\nno.</think>\n```python\n{P}```", "fence"),
    "think_close_only": (f"reasoning with {Q}\n</think>\n\n{P}", "bare"),
    "think_unclosed": (f"```python\n{P}```\n<think>what about {Q}", "fence"),
    "revised_answer": (f"```python\n{Q}```\nWait, it should use fn_a:\n```python\n{P}```", "fence"),
    "imports_and_prints": (f"```python\nimport step\n{P}print(x)\n```", "salvaged"),
    "multiline_statement": ("```\nx = step.Map(\n    fn=fn_a,\n).apply(E0)\nreturn x\n```", "fence"),
    "crlf": (f"```python\r\n{P.replace(chr(10), chr(13) + chr(10))}```", "fence"),
    "repl_prompt": (">>> x = step.Map(fn=fn_a).apply(E0)\n>>> return x\n", "bare"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_extracts_the_program(name):
    reply, source = CASES[name]
    found = extract_program(reply)
    assert found is not None, extract_program_with_reason(reply)[1]
    assert format_program(parse_program(found.program)) == P
    assert found.source == source
    assert found.statements == 2


def test_keeps_comments_and_layout_of_the_chosen_block():
    program = "# map it\nx = step.Map(fn=fn_a).apply(E0)  # the map\n\nreturn x\n"
    found = extract_program(f"Answer:\n```python\n{program}```\n")
    assert found.program == program


def test_the_answer_beats_the_reasoning_and_fences_beat_bare_text():
    reply = f"<think>\n```python\n{P}```\n</think>\nSo:\n{Q}"
    assert extract_program(reply).program == Q
    reply = f"{Q}\nor, as a block:\n```python\n{P}```"
    assert extract_program(reply).program == P


def test_the_full_block_beats_what_is_derived_from_it():
    program = "# header comment\n" + P
    assert extract_program(f"```python\n{program}```").program == program


@pytest.mark.parametrize("reply,reason", [
    ("", "empty"),
    ("   \n\t", "empty"),
    ("I do not know how to write this.", "no STeP statements"),
    ("```python\nimport os\nos.system('rm -rf /')\n```", "no STeP statements"),
    ("```python\nx = step.Map(fn=fn_a).apply(E0)\n```", "must end with `return`"),
    ("```python\nx = step.Map(fn=fn_a).apply(E0[0])\nreturn x\n```", "subscript"),
    ("```python\nfor i in range(3):\n    x = step.Map(fn=fn_a).apply(E0)\nreturn x\n```", "a for loop"),
    ("```python\nx = step.Map(fn=fn_a).apply(E0)\nif x:\n    return x\n```", "an if statement"),
])
def test_unusable_replies_give_none_with_a_reason(reply, reason):
    assert extract_program(reply) is None
    found, why = extract_program_with_reason(reply)
    assert found is None and reason in why
    assert "\n" not in why


def test_non_text_gives_none():
    assert extract_program_with_reason(None) == (None, "the reply is not text (NoneType)")


def test_every_knowledge_impl_survives_a_chatty_reply():
    for name, _ in load_knowledge().examples():
        impl = load_knowledge().example_map[name].impl
        reply = f"<think>Let me see... the task has fns.</think>\nHere is the impl:\n\n```python\n{impl}```\n\nDone."
        assert extract_program(reply).program == impl, name


# -- fuzzing: any text, never an exception ------------------------------------------

FRAGMENTS = st.sampled_from([
    "```", "```python\n", "```yaml\n", "~~~\n", "\n", "<think>", "</think>", "impl: |\n", "  ", "    ",
    "def impl(E0):\n", "x = step.Map(fn=fn_a).apply(E0)\n", "return x\n", "return\n", "a, b = step.Copy().apply(E0)\n",
    "fs = [f0, f1]\n", "ys = [step.Map(fn=f).apply(p) for p, f in zip(ps, fs)]\n", "(", ")", "[", "]", "#", "'''",
    '"""', "impl:\n", "- impl: >\n", "\t", "\r", "\x00", "step.", ".apply(", "é", "𝔰", ":", "- ", "{", "}",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_random_text_never_raises(text):
    found, why = extract_program_with_reason(text)
    if found is None:
        assert why
    else:
        parse_program(found.program)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(FRAGMENTS, st.text(max_size=12)), max_size=40))
def test_random_reply_shaped_text_never_raises(parts):
    text = "".join(parts)
    found, why = extract_program_with_reason(text)
    if found is None:
        assert why
    else:
        assert parse_program(found.program).statements
        assert found.program.endswith("\n") and found.program.strip()


PROSE = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Zs"), whitelist_characters=".,!?"),
                max_size=80)


@settings(max_examples=150, deadline=None)
@given(PROSE, PROSE, st.sampled_from(["python", "py", "", "STeP"]))
def test_a_fenced_program_in_any_prose_is_found_exactly(before, after, lang):
    impl = load_knowledge().example_map["kb_partition_merge"].impl
    found = extract_program(f"{before}\n```{lang}\n{impl}```\n{after}")
    assert found is not None and found.program == impl
