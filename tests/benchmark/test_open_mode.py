"""Open mode end to end: candidates that write their own fns, verified with the interpreted fns.

Every task verifies in open mode with its own fns as the candidate (every task fn is inside
the fn language); a task fn's body as it was before its task file was rewritten into the
language fails at the `fns` stage, naming the fn. Mutated
fns (wrong op, wrong axis, wrong init, wrong declared type) are rejected at `value` or `type`.
"""

from __future__ import annotations

import pytest
import torch
from fnlang_rewrites import ORIGINALS

from stepforge.benchmark.open_mode import CandidateError, load_candidate, reference_candidate, verify_open
from stepforge.benchmark.schema import Task, TaskFileError, load_benchmark
from stepforge.benchmark.verifier import verify

TASKS = load_benchmark()
SEEDS = (0,)

def with_fns(candidate, **changes):
    """The candidate with fn `func_name` updated by `changes[func_name]` (a dict of fields)."""
    fns = [f.model_copy(update=changes[f.func_name]) if f.func_name in changes else f for f in candidate.fns]
    return candidate.model_copy(update={"fns": fns})


@pytest.mark.parametrize("key", list(TASKS))
def test_every_task_verifies_in_open_mode(key):
    task = TASKS[key]
    verdict = verify_open(task, reference_candidate(task), seeds=SEEDS)
    assert verdict.passed, verdict.message


@pytest.mark.parametrize("original", list(ORIGINALS)[:4])
def test_a_task_fn_outside_the_language_fails_at_fns(original):
    key, func_name = ORIGINALS[original][0].split(":")
    task = TASKS[key]
    candidate = with_fns(reference_candidate(task), **{func_name: {"apply": original}})
    verdict = verify_open(task, candidate, seeds=SEEDS)
    assert verdict.stage == "fns" and verdict.message.startswith(f"fn {func_name}, line "), verdict.message


def test_open_fns_run_on_the_naive_engine_too():
    task = TASKS["attention/G_0_4_01"]
    assert verify_open(task, reference_candidate(task), seeds=SEEDS, bindings=[{}], engine="naive").passed


MUTATIONS = [
    ("bmm/bmm_2", "fn_add", {"apply": "return [state[0] - input[0]]"}, "value"),  # wrong op
    ("attention/G_0_4_01", "fn_online_softmax", None, "value"),  # wrong op: exp(new - old)
    ("gemm/G_0_6_03", "fn_mul_buffers", {"apply": "return [input[0] * input[1].flip(1)]"}, "value"),  # wrong axis
    ("norm/G_0_9_02", "fn_mean", {"apply": "x = input[0]\nreturn [x, x.cumsum(dim=0) * torch.ones_like(x)]"}, "value"),
    ("bmm/bmm_2", "fn_add", {"init": 1}, "value"),  # wrong init
    ("gemm/G_0_6_02", "fn_add", {"init": "-inf"}, "value"),
    ("bmm/bmm_2", "fn_mul", {"output_dtype": "Buffer(fp32, [D])"}, "type"),  # wrong declared type
    ("bmm/bmm_0", "fn_outer", {"input_dtype": ["Buffer(fp32, [D])", "Buffer(fp32, [N])"]}, "type"),
]


@pytest.mark.parametrize("key,func_name,change,stage", MUTATIONS)
def test_mutated_fns_are_rejected(key, func_name, change, stage):
    task = TASKS[key]
    reference = reference_candidate(task)
    if change is None:
        body = reference.fns[0].apply
        change = {"apply": body.replace("torch.exp(running_max - new_max)", "torch.exp(new_max - running_max)")}
        assert change["apply"] != body
    verdict = verify_open(task, with_fns(reference, **{func_name: change}), seeds=SEEDS)
    assert not verdict.passed and verdict.stage == stage, verdict.message
    # closed mode with the task's own fns still passes: the candidate's fns are what ran
    assert verify(task, reference.impl, seeds=SEEDS).passed


def test_candidate_text_round_trips_and_a_reply_block_is_read():
    task = TASKS["norm/G_0_8_01"]
    reference = reference_candidate(task)
    text = reference.to_yaml()
    assert load_candidate(text) == reference
    reply = f"Here are my fns and program.\n```yaml\n{text}```\nDone."
    assert verify_open(task, reply, seeds=SEEDS).passed


@pytest.mark.parametrize("text,expected", [
    ("fns: [\n", "not valid YAML"),
    ("- 1\n- 2\n", "a YAML mapping"),
    ("fns: []\n", "impl"),
    ("impl: 'return'\nfns:\n- {name: a, func_name: f, input_dtype: fp33, output_dtype: fp32, apply: 'input[0]'}\n",
     "fns[0].input_dtype"),
    ("impl: 'return'\nfns:\n- {name: a, func_name: f, input_dtype: fp32, output_dtype: fp32, apply: 'input[0]'}\n"
     "- {name: b, func_name: f, input_dtype: fp32, output_dtype: fp32, apply: 'input[0]'}\n", "repeats"),
    ("impl: 'return'\nfns: []\nextra: 1\n", "unknown key"),
])
def test_malformed_candidates_fail_at_fns(text, expected):
    verdict = verify_open(TASKS["bmm/bmm_2"], text)
    assert verdict.stage == "fns" and expected in verdict.message, verdict.message
    with pytest.raises(CandidateError):
        load_candidate(text)


def test_an_evil_candidate_fails_at_fns_and_never_runs(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setattr(torch, "save", lambda *a, **k: target.write_text("ran"))
    task = TASKS["bmm/bmm_2"]
    reference = reference_candidate(task)
    evil = with_fns(reference, fn_mul={"apply": f"x = input[0] * input[1]\ny = torch.save(x, '{target}')\nreturn [x]"})
    verdict = verify_open(task, evil.to_yaml())
    assert verdict.stage == "fns" and verdict.message.startswith("fn fn_mul, line 2: "), verdict.message
    assert not target.exists()


def test_open_false_and_vocabulary_of_a_task():
    task = TASKS["bmm/bmm_0"]
    closed = Task.from_yaml(task.to_yaml().replace("impl:", "open: false\nimpl:"))
    assert closed.open is False and closed.fingerprint() == task.fingerprint()
    with pytest.raises(ValueError, match="open: false"):
        verify_open(closed, reference_candidate(closed))
    # a task that narrows its vocabulary: the reference's torch.outer is no longer allowed
    narrowed = Task.from_yaml(task.to_yaml().replace("impl:", "vocabulary: {remove: [outer]}\nimpl:"))
    assert Task.from_yaml(narrowed.to_yaml()) == narrowed
    verdict = verify_open(narrowed, reference_candidate(narrowed), seeds=SEEDS)
    assert verdict.stage == "fns" and "'outer' is not in the vocabulary" in verdict.message
    with pytest.raises(TaskFileError, match="unknown vocabulary name"):
        Task.from_yaml(task.to_yaml().replace("impl:", "vocabulary: {add: [load]}\nimpl:"))
