"""Repair turns: the verdict reaches the proposer (per stage), records and metrics of turns, the estimate.

`FeedbackModel` is a model backend for the real `LLMProposer`: it answers a
task's first prompt with a program known to fail at one stage, and answers
with the reference impl only when the last user message of the chat holds
the verifier's own message about that failure. Verification is the real
verifier on real tasks, so a task solved at turn 1 proves that the message
(stage, text, sizes, seed) went from the verdict through the template into
the prompt.

`repair_factory` is the `proposer.factory` of the subprocess tests in
test_repair_resume.py (PYTHONPATH=tests/loop).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import pytest

from stepforge.benchmark.schema import load_benchmark
from stepforge.benchmark.verifier import verify
from stepforge.loop.agents.proposer import LLMProposer
from stepforge.loop.algorithm import LoopSettings, run_algorithm1
from stepforge.loop.budget import estimate
from stepforge.loop.executor import default_extract
from stepforge.loop.interfaces import Proposal, ProposalRequest, Proposer
from stepforge.loop.reporting.metrics import repair_metrics
from stepforge.serve.base import Completion, GenerationRequest, GenerationResult, ModelBackend

TASKS = load_benchmark()
SEEDS = (0, 1)
BMM, ROPE = "bmm/bmm_0", "rope/G_0_3_02"
B = TASKS[BMM].impl

# stage -> (task, a reply whose program fails at that stage)
BAD = {
    "parse": (BMM, "```python\nx = step.Map(fn=fn_add).apply(E0\nreturn x\n```"),
    "type": (BMM, "```python\n" + B.replace("step.Map(fn=fn_outer)", "step.Map(fn=fn_add)") + "```"),
    "affine": (BMM, "```python\n" + B.replace("b = step.Bufferize(a=1).apply(E1)",
                                              "b = step.Bufferize(a=1).apply(E1)\nc = step.Bufferize(a=1).apply(E0)")
               + "```"),
    "shape": (BMM, "```python\na = step.Bufferize(a=1).apply(E0)\nS0 = step.Streamify().apply(a)\nreturn S0\n```"),
    "value": (ROPE, "```python\npairs = step.Zip().apply((E0, E1))\nS0 = step.Map(fn=fn_rotate).apply(pairs)\n"
                    "return S0\n```"),
}


def _verify(key: str, program: str):
    return verify(TASKS[key], program, seeds=SEEDS)


def expected_feedback(reply: str, key: str) -> str:
    """What the verifier (or the reply parser, for stage parse) says about `reply`."""
    program, why = default_extract(reply)
    return why if program is None else _verify(key, program).message


class FeedbackModel(ModelBackend):
    """Bad reply first; the reference impl once the last user turn holds `needle[task]`. Tokens: words."""

    def __init__(self, bad: dict[str, str], needle: dict[str, str]):
        self.bad, self.needle = bad, needle
        self.seen: list[list[dict[str, str]]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for r in requests:
            self.seen.append(r.messages)
            task = r.request_id.rsplit("#", 1)[0]
            last = r.messages[-1]["content"]
            fixed = len(r.messages) > 2 and self.needle[task] in last
            text = f"```python\n{TASKS[task].impl}```" if fixed else self.bad[task]
            completions = [Completion(text=text, completion_tokens=len(text.split()), finish_reason="stop")] * r.sampling.n
            out.append(GenerationResult(request_id=r.request_id, completions=completions,
                                        prompt_tokens=sum(self.count_tokens(m["content"]) for m in r.messages)))
        return out


def _run(task: str, reply: str, needle: str, repair_turns: int = 1, n: int = 1):
    model = FeedbackModel({task: reply}, {task: needle})
    proposer = LLMProposer(model, style="ir")
    settings = LoopSettings(temperatures=(0.4,), n=n, adaptive=False, repair_turns=repair_turns)
    return model, run_algorithm1({task: TASKS[task]}, proposer, None, _verify, settings)


@pytest.mark.parametrize("stage", sorted(BAD))
def test_the_verdict_message_reaches_the_proposer(stage):
    task, reply = BAD[stage]
    message = expected_feedback(reply, task)
    first = default_extract(reply)[0]
    assert first is None if stage == "parse" else _verify(task, first).stage == stage
    model, result = _run(task, reply, message)
    recs = result.steps[0].records
    assert [(r.turn, r.correct) for r in recs] == [(0, False), (1, True)]
    assert recs[0].verdict.stage == stage and recs[1].parent == recs[0].key and recs[1].key.endswith("/k1")
    assert result.unsolved == [] and result.buffer[0].impl.strip() == TASKS[task].impl.strip()
    follow_up = model.seen[1]
    assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]
    assert follow_up[2]["content"].strip() == reply.strip() and f"`{stage}` stage" in follow_up[3]["content"]
    if stage == "value":  # the largest error, where it is, and the failing sizes and seed
        assert "worst at (" in message and "|error|" in message
        assert "sizes M=" in follow_up[3]["content"] and "input seed 0" in follow_up[3]["content"]
    # the same scripted model without the message (a needle the verdict does not hold) never fixes it
    _, deaf = _run(task, reply, message + " (not said)", repair_turns=2)
    assert [(r.turn, r.correct) for r in deaf.steps[0].records] == [(0, False), (1, False), (2, False)]
    assert deaf.unsolved == [task]


def test_repair_turns_zero_is_the_published_loop():
    task, reply = BAD["type"]
    model, result = _run(task, reply, expected_feedback(reply, task), repair_turns=0, n=2)
    assert [r.turn for r in result.steps[0].records] == [0, 0] and result.unsolved == [task]
    assert len(model.seen) == 1


def test_search_proposer_is_not_asked_for_repairs():
    from stepforge.loop.search import SearchProposer

    settings = LoopSettings(temperatures=(0.4,), n=1, adaptive=False, repair_turns=2)
    search = SearchProposer({"max_expansions": 5})
    result = run_algorithm1({ROPE: TASKS[ROPE]}, search, None, _verify, settings)
    assert all(r.turn == 0 for r in result.steps[0].records)


def test_difficulty_counts_turns_and_metrics_by_turn():
    """Two first answers, one fixed at turn 1: success rate 1 correct / 3 answers; pass@1 by turn."""
    task, reply = BAD["type"]
    _, result = _run(task, reply, expected_feedback(reply, task), repair_turns=2, n=2)
    recs = result.steps[0].records
    assert sorted((r.index, r.turn, r.correct) for r in recs) == [(0, 0, False), (0, 1, True), (1, 0, False),
                                                                 (1, 1, True)]
    entry = result.buffer[0]
    assert (entry.success_count, entry.n_samples) == (2, 4) and entry.success_rate == 0.5
    m = repair_metrics([r.model_dump() for r in recs])
    assert [(t["turn"], t["samples"], t["correct"], t["tasks_solved"], t["pass@1"]) for t in m["per_turn"]] == \
        [(0, 2, 0, 0, 0.0), (1, 2, 2, 1, 1.0)]
    assert m["tasks_solved_by_repair"] == [task] and m["tokens_per_solved_task_first_turns"] is None
    assert m["tokens_per_solved_task"] == sum(r.prompt_tokens + r.completion_tokens for r in recs[:1]) + \
        sum(r.completion_tokens for r in recs[1:2]) + sum(r.prompt_tokens + r.completion_tokens for r in recs[2:])


def test_estimate_equals_tokens_spent_within_completions(hf_backend):
    """The tiny model's tokenizer: round 0's estimate is its prompt tokens, exactly."""
    proposer = LLMProposer(hf_backend, style="ir", max_tokens=4)
    tasks = {BMM: TASKS[BMM], ROPE: TASKS[ROPE]}
    settings = LoopSettings(temperatures=(0.4, 1.0), n=2, adaptive=False)
    est = estimate(proposer, tasks, settings, max_tokens=4)
    result = run_algorithm1(tasks, proposer, None, _verify, settings)
    recs = result.steps[0].records
    prompt = sum({(r.task, r.temperature): r.prompt_tokens for r in recs}.values())
    completion = sum(r.completion_tokens for r in recs)
    assert est.samples == len(recs) == 8 and est.requests == 4
    assert est.prompt_tokens == prompt and 0 <= prompt + completion - est.prompt_tokens <= completion
    assert est.max_completion_tokens == 8 * 4 >= completion


# ---------------------------------------------------------------------------
# the scripted proposer of the subprocess tests


class RepairScripted(Proposer):
    """On real tasks: a wrong first answer; a follow-up is the reference impl when the request's seed says so
    (about one in `every`) and the last verdict carries a message. Logs every request to $STEPFORGE_REQUEST_LOG."""

    name = "scripted-repair"

    def __init__(self, impls: dict[str, str], every: int = 2, delay_s: float = 0.0, log: Optional[str] = None):
        self.impls, self.every, self.delay_s, self.log = impls, every, delay_s, log

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        out = []
        for r in requests:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.log:
                with open(self.log, "a") as fh:
                    fh.write(json.dumps({"task": r.task_key, "seed": r.seed, "n": r.n, "turn": len(r.history)}) + "\n")
            good = bool(r.history) and bool(r.history[-1].verdict.message) and r.seed % self.every == 0
            text = self.impls[r.task_key] if good else "x = step.Map(fn=nope).apply(E0)\nreturn x\n"
            out.append([Proposal(raw=f"```python\n{text}```\n", prompt_tokens=11 + 5 * len(r.history),
                                 completion_tokens=len(text) // 4)] * r.n)
        return out


def repair_factory(cfg, tasks) -> Proposer:
    """`proposer.factory: test_repair:repair_factory` (options: every, delay_s)."""
    opts = dict(cfg.proposer.options)
    delay = float(os.environ.get("STEPFORGE_TEST_DELAY_S", opts.get("delay_s", 0.0)))
    return RepairScripted({k: t.impl for k, t in tasks.items()}, every=int(opts.get("every", 2)), delay_s=delay,
                          log=os.environ.get("STEPFORGE_REQUEST_LOG"))
