"""Open mode (docs/language.md, section 5a) through the loop: replies, dedup, prompts, guardians, verifier backends, a run.

An open candidate is the task's own fns and impl as YAML (`reference_candidate`)
unless a test changes it; everything runs on CPU without a network.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepforge.benchmark.open_mode import OpenCandidate, reference_candidate, verify_open
from stepforge.benchmark.schema import load_benchmark
from stepforge.loop.agents.guardians import RuleGuardian
from stepforge.loop.agents.knowledge import load_knowledge
from stepforge.loop.agents.open_prompts import open_knowledge, render_open_task
from stepforge.loop.agents.prompts import proposer_messages
from stepforge.loop.agents.replies import extract_candidate_with_reason
from stepforge.loop.candidates import candidate_impl, parse_candidate
from stepforge.loop.dedup import canonical_candidate, dedup, select_shortest
from stepforge.loop.interfaces import Demonstration, GuardRequest
from stepforge.loop.verifiers import InlineVerifier, PoolVerifier

TASKS = load_benchmark()
KNOWLEDGE = load_knowledge()
KEYS = ["attention/G_0_4_01", "gemm/G_0_6_02", "bmm/bmm_0", "norm/G_0_8_01", "moe-index/G_0_3_03"]


def ref(key: str) -> str:
    return reference_candidate(TASKS[key]).to_yaml()


# -- the reply parser -------------------------------------------------------------------------


def test_reply_parser_takes_the_candidate_from_any_usual_shape():
    y = ref("gemm/G_0_6_02")
    other = ref("bmm/bmm_0")
    shapes = [f"```yaml\n{y}```", f"Here it is:\n\n```yaml\n{y}```\nThis sums over K.", y, f"```\n{y}```",
              f"<think>first try:\n```yaml\n{other}```</think>\n```yaml\n{y}```",  # the answer, not the reasoning
              f"```yaml\n{other}```\nrevised:\n```yaml\n{y}```",  # the last block
              f"```yaml\n{y}",  # unclosed fence (out of tokens after the candidate)
              "```yaml\n" + y.replace("impl: |\n", "impl: |\n  # wires the fns\n") + "```"]
    for reply in shapes:
        got, why = extract_candidate_with_reason(reply)
        assert why == "" and got is not None, (reply, why)
        assert canonical_candidate(got) == canonical_candidate(y)
    assert extract_candidate_with_reason(f"```yaml\n{y}```")[0] == y  # written back in the one candidate form


def test_reply_parser_names_what_is_wrong():
    assert extract_candidate_with_reason("")[1] == "the reply is empty"
    assert "no open candidate" in extract_candidate_with_reason("S0 = step.Map(fn=f).apply(E0)\nreturn S0")[1]
    bad_impl = "```yaml\nfns: []\nimpl: |\n  this is not STeP\n```"
    assert extract_candidate_with_reason(bad_impl)[1].startswith("no usable open candidate in the reply: impl:")
    missing = "```yaml\nfns:\n  - name: a\nimpl: |\n  return E0\n```"
    got, why = extract_candidate_with_reason(missing)
    assert got is None and "fns" in why


FRAGMENTS = ["```yaml\n", "```\n", "fns:\n", "  - name: f\n", "    func_name: fn_f\n", "    input_dtype: fp32\n",
             "    output_dtype: fp32\n", "    apply: |\n", "      [input[0] * 2]\n", "impl: |\n",
             "  S0 = step.Map(fn=fn_f).apply(E0)\n", "  return S0\n", "<think>", "</think>", "init: [0]\n",
             "{", "[", ": |", "&a *a\n", "!!python/object:os.system\n", "\t", "\x00", "impl: 3\n"]


@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_reply_parser_never_raises(reply):
    got, why = extract_candidate_with_reason(reply)
    assert (got is None) == bool(why)
    if got is not None:  # what it returns is a candidate the loop can carry and key
        assert parse_candidate(got) is not None and canonical_candidate(got) is not None


# -- dedup ----------------------------------------------------------------------------------------


def _renamed(text: str, tag: str, order: list[int]) -> str:
    """The candidate with every fn-local name, func_name and program variable renamed, fns reordered."""
    cand = parse_candidate(text)
    fn_names = {f.func_name: f"{tag}fn{i}" for i, f in enumerate(cand.fns)}

    def sub(code: str, names: dict[str, str]) -> str:
        for old, new in names.items():  # a keyword argument (`a=1`) is not a name
            code = re.sub(rf"\b{re.escape(old)}\b(?!=)", new, code)
        return code

    fns = []
    for f in cand.fns:
        stores = {n.id for n in ast.walk(ast.parse(f.apply)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        body = sub(f.apply, {n: f"{tag}_{n}" for n in sorted(stores)})
        fns.append(f.model_copy(update={"func_name": fn_names[f.func_name], "apply": body, "name": tag + f.name}))
    targets = set(re.findall(r"^\s*(\w+(?:\s*,\s*\w+)*)\s*=", cand.impl, re.M))
    variables = {v.strip() for t in targets for v in t.split(",")}
    impl = sub(cand.impl, {**fn_names, **{v: f"{tag}{v}" for v in sorted(variables)}})
    ordered = [fns[i] for i in order if i < len(fns)] + [f for i, f in enumerate(fns) if i not in order]
    return OpenCandidate(fns=ordered, impl=impl).to_yaml()


@given(st.sampled_from(KEYS), st.sampled_from(["x", "q_", "tmp"]), st.permutations([0, 1, 2]))
@settings(max_examples=30, deadline=None)
def test_alpha_renamed_candidates_are_one(key, tag, order):
    y = ref(key)
    z = _renamed(y, tag, list(order))
    assert z != y
    assert canonical_candidate(z) == canonical_candidate(y)
    assert dedup([y, z]) == [y]


def test_a_different_fn_or_program_is_a_different_candidate():
    y = ref("gemm/G_0_6_02")
    variants = [y.replace("state[0] + input[0]", "state[0] - input[0]"),  # another body
                y.replace("init: 0", "init: 1"),  # another init
                y.replace("Repeat(n=M)", "Repeat(n=N)")]  # another program
    keys = {canonical_candidate(v) for v in variants} | {canonical_candidate(y)}
    assert None not in keys and len(keys) == 4
    assert len(dedup([y, *variants])) == 4
    assert canonical_candidate(candidate_impl(y)) is None  # a bare program is not a candidate


def test_the_shortest_candidate_counts_its_fns():
    y = ref("gemm/G_0_6_02")
    longer = y.replace("      return [input[0] * input[1]]\n", "      a = input[0]\n      b = input[1]\n      return [a * b]\n")
    assert parse_candidate(longer) is not None
    assert select_shortest([longer, y]) == y


# -- prompts ----------------------------------------------------------------------------------


def test_open_prompt_shows_the_task_without_fns_and_keeps_the_closed_prefix():
    for key, task in TASKS.items():
        closed = proposer_messages(KNOWLEDGE, [], task)
        opened = proposer_messages(KNOWLEDGE, [], task, mode="open")
        assert opened[0]["content"].startswith(closed[0]["content"].rstrip("\n"))  # prefix caching
        task_block = opened[1]["content"].rsplit("```yaml\n", 1)[1]
        assert "fns:" not in task_block and "func_name" not in task_block and "impl" not in task_block, key
        assert yaml.safe_load(task_block.split("```")[0])["test_name"] == task.test_name
        for f in task.fns:  # its fns are never shown (the examples' are theirs, not the task's)
            if f.func_name not in opened[0]["content"]:
                assert f.func_name not in opened[1]["content"], key


def test_open_prompt_teaches_the_language_vocabulary_and_open_examples():
    from stepforge.simulator.fnlang_vocab import STANDARD

    system = proposer_messages(KNOWLEDGE, [], TASKS["gemm/G_0_6_02"], mode="open")[0]["content"]
    listed = " ".join(open_knowledge()["vocabulary"].values()).replace("(also @)", "").split()
    assert sorted(listed) == sorted(STANDARD)
    for name in STANDARD:
        assert re.search(rf"\b{name}\b", system), name
    for name in open_knowledge()["examples"]:
        task = KNOWLEDGE.example_map[name].task
        assert render_open_task(task) in system and ref_of(task) in system
        assert verify_open(task, reference_candidate(task), seeds=(0,)).passed, name  # the example is true


def ref_of(task) -> str:
    return reference_candidate(task).to_yaml().rstrip("\n")


def test_open_demonstrations_show_earned_fns_and_task_without_fns():
    demo_task = TASKS["bmm/bmm_0"]
    earned = _renamed(ref("bmm/bmm_0"), "my", [1, 0])  # fns the model wrote, not the task file's
    demos = [Demonstration(task_key="bmm/bmm_0", task=demo_task, impl=earned, mode="open"),
             Demonstration(task_key="gemm/G_0_6_02", task=TASKS["gemm/G_0_6_02"], impl=TASKS["gemm/G_0_6_02"].impl)]
    for mode in ("open", "closed"):
        user = proposer_messages(KNOWLEDGE, demos, TASKS["norm/G_0_8_01"], mode=mode)[1]["content"]
        assert "### Solved open task 1" in user and "### Solved task 2" in user
        assert "```yaml\n" + earned.rstrip("\n") + "\n```" in user  # the earned candidate, as earned
        shown_task = user.split("### Solved open task 1", 1)[1].split("answer:", 1)[0]
        assert "fns:" not in shown_task and render_open_task(demo_task) in shown_task
        assert "fn_outer" not in user  # the task file's own func_names are not shown
    # the closed target keeps its closed instruction and the task with fns
    closed_user = proposer_messages(KNOWLEDGE, demos, TASKS["norm/G_0_8_01"])[1]["content"]
    assert "```python block" in closed_user and "fns:" in closed_user.rsplit("Task:", 1)[1]


# -- guardians and verifier backends ------------------------------------------------------------


def test_rule_guardian_repairs_the_impl_and_keeps_the_fns():
    task = KNOWLEDGE.example_map["kb_repeat"].task
    cand = reference_candidate(task)
    broken = ("total = step.Accum(fn=fn_add, b=1).apply(E0)\nmean = step.Map(fn=fn_div_k).apply(total)\n"
              "mean_k = step.Repeat(n=K).apply(mean)\nS0 = step.Map(fn=fn_sub).apply((E0, mean_k))\nreturn S0, mean\n")
    text = OpenCandidate(fns=cand.fns, impl=broken).to_yaml()
    assert verify_open(task, text, seeds=(0,)).stage == "affine"
    (res,) = RuleGuardian().repair([GuardRequest(task_key="kb_repeat", task=task, program=text, mode="open")])
    assert res.changed and parse_candidate(res.program).fns == cand.fns
    assert "Copy" in candidate_impl(res.program)
    assert verify_open(task, res.program, seeds=(0,)).passed
    (same,) = RuleGuardian().repair([GuardRequest(task_key="kb_repeat", task=task, program=ref_of(task) + "\n",
                                                  mode="open")])
    assert not same.changed


def test_inline_and_pool_verifiers_take_open_items():
    from stepforge.benchmark.pool import VerifierPool

    key = "gemm/G_0_6_02"
    task = TASKS[key]
    good, closed = ref(key), task.impl
    wrong_fn = good.replace("state[0] + input[0]", "state[0] * input[0]")
    outside = good.replace("return [input[0] * input[1]]", "return [__import__('os')]")
    items = [(0, key, good, "open"), (1, key, closed), (2, key, wrong_fn, "open"), (3, key, outside, "open"),
             (4, key, "not yaml: [", "open")]
    inline = InlineVerifier(lambda k, text, mode="closed": verify_open(TASKS[k], text, seeds=(0,)) if mode == "open"
                            else __import__("stepforge.benchmark.verifier", fromlist=["verify"]).verify(
                                TASKS[k], text, seeds=(0,)))
    inline.submit(items)
    want = {0: "ok", 1: "ok", 2: "value", 3: "fns", 4: "fns"}
    assert {t: v.stage for t, v in inline.poll()} == want
    pool = PoolVerifier(VerifierPool(1, 60, tasks={key: task}, verify_kwargs={"seeds": (0,)}))
    try:
        pool.submit(items)
        got = {}
        while len(got) < len(items):
            got.update({t: v.stage for t, v in pool.poll(timeout=1.0)})
        assert got == want
    finally:
        pool.close()


# -- a whole run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode_setting", ["open", "mixed"])
def test_improve_in_open_mode_end_to_end(tmp_path, mode_setting):
    """`stepforge improve` with the scripted proposer answering candidates (the task's fns + impl)."""
    from stepforge.loop.interfaces import BufferEntry
    from stepforge.loop.job import run_improve
    from stepforge.loop.runstore import load_jsonl

    easy, hard, closed_task = "gemm/G_0_6_02", "moe-index/G_0_3_03", "bmm/bmm_0"
    tasks = [easy, hard, closed_task] if mode_setting == "open" else [f"open:{easy}", f"open:{hard}",
                                                                      f"closed:{closed_task}"]
    config = {"name": "open-run", "tasks": tasks, "mode": "open" if mode_setting == "open" else "closed",
              "variant": "agent+si",
              "proposer": {"kind": "custom", "factory": "test_loop_scripted:benchmark_factory",
                           "options": {"every": 1, "needs_demos": [hard]}},
              "guardian": {"kind": "rule"}, "temperatures": [0.4], "n": 1, "max_rounds": 3,
              "verifier": {"kind": "inline", "seeds": [0]}, "progress": False}
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_improve(path, run_dir=tmp_path / "run")
    run = tmp_path / "run"
    modes = {easy: "open", hard: "open", closed_task: "open" if mode_setting == "open" else "closed"}
    samples = load_jsonl(run / "samples.jsonl")
    assert samples and all(r["mode"] == modes[r["task"]] for r in samples)
    steps = load_jsonl(run / "steps.jsonl")
    assert [(s["round"], s["solved"]) for s in steps] == [(0, [closed_task, easy]), (1, [hard])]  # benchmark order
    buffer = [BufferEntry.model_validate_json(x) for x in (run / "buffer.jsonl").read_text().splitlines()]
    for entry in buffer:
        assert entry.mode == modes[entry.task_key]
        if entry.mode == "open":  # an earned candidate: its own fns, and it verifies with them
            assert parse_candidate(entry.impl) is not None
            assert verify_open(TASKS[entry.task_key], entry.impl, seeds=(0,)).passed
        else:
            assert parse_candidate(entry.impl) is None and entry.impl == TASKS[entry.task_key].impl
    summary = outcome.summary
    assert summary["mode"] == ("open" if mode_setting == "open" else "mixed")
    assert {k: v["mode"] for k, v in summary["tasks"].items()} == modes
    assert summary["run"]["tasks_solved"] == 3
    assert json.loads((run / "state.json").read_text())["modes"] == {k: modes[k] for k in TASKS if k in modes}
    report = (run / "report.md").read_text()
    assert f"## Result ({summary['mode']} mode)" in report


def test_open_mode_refuses_a_task_that_cannot_be_posed_openly():
    from stepforge.loop.config import ConfigError, task_modes

    closed_only = {k: t.model_copy(update={"open": False}) if k == "bmm/bmm_0" else t for k, t in TASKS.items()}
    with pytest.raises(ConfigError, match="bmm/bmm_0 cannot be posed in open mode"):
        task_modes(["bmm/*"], closed_only, "open", "cfg.yaml")
    assert task_modes(["closed:bmm/bmm_0", "gemm/*"], closed_only, "open", "cfg.yaml")["bmm/bmm_0"] == "closed"
    assert set(task_modes({"groups": ["gemm"], "mode": "open"}, TASKS, "closed", "cfg.yaml").values()) == {"open"}
    with pytest.raises(ConfigError, match="both modes"):
        task_modes(["open:bmm/*", "closed:bmm/bmm_0"], TASKS, "closed", "cfg.yaml")
    with pytest.raises(ConfigError, match="nope"):
        task_modes(["gemm/*", "open:nope"], TASKS, "closed", "cfg.yaml")
