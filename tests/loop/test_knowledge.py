"""The base knowledge: every worked example verifies, the rendering covers all 14 operators."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from stepforge.benchmark.schema import Task
from stepforge.benchmark.verifier import verify
from stepforge.loop.agents.guardians import repair_affine
from stepforge.loop.agents.knowledge import KNOWLEDGE_DIR, KnowledgeError, load_knowledge
from stepforge.simulator import check_affine, parse_program
from stepforge.simulator.program import OPS

KNOWLEDGE = load_knowledge()
EXAMPLES = KNOWLEDGE.examples()


@pytest.mark.parametrize("name,text", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_every_example_verifies(name, text):
    task = Task.from_yaml(text, source=name)
    verdict = verify(task, task.impl)
    assert verdict.passed, verdict.short()
    assert verdict.affine_ok
    assert verdict.runs >= 2 * 3  # the default sizes and at least one other binding, three seeds each


def test_examples_use_every_operator_and_every_op_has_an_example():
    used = set()
    for _, text in EXAMPLES:
        for st in parse_program(Task.from_yaml(text).impl).statements:
            if hasattr(st, "call"):
                used.add(st.call.op)
    assert used == set(OPS)
    for doc in KNOWLEDGE.operators:
        assert doc.examples, doc.op


# Wrong programs for some examples: the verifier must reject them, so a test above that passes means something.
WRONG = [
    ("kb_scan", "S0 = step.Accum(fn=fn_add, b=1).apply(E0)\nreturn S0\n", "shape"),
    ("kb_copy", "S0 = step.Accum(fn=fn_add, b=1).apply(E0)\nS1 = step.Accum(fn=fn_max, b=2).apply(E0)\n"
                "return S0, S1, E0\n", "affine"),
    ("kb_reshape", "chunks = step.Reshape(L=[0], S=2).apply(E0)\nS0 = step.Accum(fn=fn_add, b=1).apply(chunks)\n"
                   "return S0\n", "shape"),
    ("kb_repeatref", "ref, rows = step.Copy().apply(E1)\nscale = step.RepeatRef().apply((E0, ref))\n"
                     "S0 = step.Map(fn=fn_mul).apply((scale, rows))\nreturn S0\n", "ok"),  # commutative: also right
    ("kb_partition_merge", "route_0, route_1 = step.Copy().apply(E1)\n"
                           "parts = step.Partition(N=E_value).apply((E0, route_0))\n"
                           "experts = [fn_add_one, fn_double]\n"
                           "outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, experts)]\n"
                           "S0 = step.Merge(fn=fn_sum).apply((outs, route_1))\nreturn S0\n", "value"),
]


@pytest.mark.parametrize("name,program,stage", WRONG, ids=[w[0] for w in WRONG])
def test_verifier_tells_right_from_wrong_on_examples(name, program, stage):
    verdict = verify(KNOWLEDGE.example_map[name].task, program)
    assert verdict.stage == stage, verdict.short()


def test_render_mentions_all_operators_once_each_as_a_section():
    text = KNOWLEDGE.render()
    for op in OPS:
        assert len(re.findall(rf"^### {op}$", text, re.M)) == 1, op
        assert f"step.{op}(" in text, op


def test_render_shows_every_example_once_with_its_impl_and_without_metadata():
    text = KNOWLEDGE.render()
    for name, _ in EXAMPLES:
        example = KNOWLEDGE.example_map[name]
        assert len(re.findall(rf"^#### Example {name}:", text, re.M)) == 1, name
        assert example.impl.rstrip("\n") in text
    assert "bindings:" not in text and "description:" not in text and "group:" not in text


def test_render_covers_the_language_rules():
    text = KNOWLEDGE.render()
    for needle in ("consumed at most once", "innermost first", "no imports", "return", "E_value", "state[j]"):
        assert needle in text, needle


def test_render_is_compact_and_deterministic():
    text = KNOWLEDGE.render()
    assert len(text) < 24_000
    assert text == load_knowledge().render()
    python = KNOWLEDGE.render("python")
    assert python != text and "def fn_square(input, state=None):" in python
    with pytest.raises(ValueError):
        KNOWLEDGE.render("java")


def test_guardian_examples_are_true():
    """Before breaks the affine rule, after obeys it; both compute the task's outputs; the rule guardian agrees."""
    assert len(KNOWLEDGE.guardian_examples) >= 2
    for ex in KNOWLEDGE.guardian_examples:
        task = KNOWLEDGE.example_map[ex.task].task
        assert check_affine(parse_program(ex.before))
        assert not check_affine(parse_program(ex.after))
        before = verify(task, ex.before, check_affine=False, seeds=(0,))
        assert before.passed and not before.affine_ok, before.short()
        after = verify(task, ex.after, seeds=(0,))
        assert after.passed, after.short()
        assert repair_affine(ex.before).program == ex.after


# -- the loader's checks ---------------------------------------------------------------


@pytest.fixture
def knowledge_copy(tmp_path):
    root = tmp_path / "knowledge"
    shutil.copytree(KNOWLEDGE_DIR, root)
    return root


def test_loading_a_copy_gives_the_same_knowledge(knowledge_copy):
    assert load_knowledge(knowledge_copy).render() == KNOWLEDGE.render()


def test_a_missing_operator_is_named(knowledge_copy):
    path = knowledge_copy / "operators.yaml"
    data = yaml.safe_load(path.read_text())
    data["operators"] = [d for d in data["operators"] if d["op"] != "Scan"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KnowledgeError, match=r"operators\.yaml: operators: .*missing \['Scan'\]"):
        load_knowledge(knowledge_copy)


def test_an_example_that_does_not_use_its_operator_is_named(knowledge_copy):
    path = knowledge_copy / "operators.yaml"
    data = yaml.safe_load(path.read_text())
    for d in data["operators"]:
        if d["op"] == "Reshape":
            d["examples"] = ["kb_map"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KnowledgeError, match=r"operators\[\d+\]\.examples: example kb_map does not use Reshape"):
        load_knowledge(knowledge_copy)


def test_an_unknown_example_and_a_broken_impl_are_named(knowledge_copy):
    path = knowledge_copy / "operators.yaml"
    text = path.read_text()
    path.write_text(text.replace("examples: [kb_scan]", "examples: [kb_nope]"))
    with pytest.raises(KnowledgeError, match="no worked example 'kb_nope'"):
        load_knowledge(knowledge_copy)
    path.write_text(text)
    ex = knowledge_copy / "kb_map.yaml"
    ex.write_text(ex.read_text().replace("return S0", "import os\n  return S0"))
    with pytest.raises(KnowledgeError, match=r"kb_map\.yaml: impl: line 2: an import is not part of STeP"):
        load_knowledge(knowledge_copy)
