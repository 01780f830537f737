"""Metrics: pass@k against brute-force enumeration, aggregation, maintainability index."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepforge.loop.reporting.metrics import (
    maintainability,
    pass_at_k,
    round_metrics,
    run_metrics,
    strip_comments,
    task_completion,
    task_metrics,
)


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Exact: the fraction of k-subsets of n samples (c correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(samples[i] for i in s))
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-12), (n, c, k)


@given(st.integers(1, 400), st.data())
def test_pass_at_k_matches_closed_form_and_stays_in_range(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    got = pass_at_k(n, c, k)
    assert 0.0 <= got <= 1.0
    if n - c >= k:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert got == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    else:
        assert got == 1.0


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(0, 0, 1) == 0.0
    assert pass_at_k(3, 1, 5) == 1.0  # k > n is capped at n
    for bad in ((3, 4, 1), (3, 1, 0), (-1, 0, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def _rec(task, rnd, step, temp, correct, prompt=10, completion=4, verified=True):
    return {"task": task, "round": rnd, "step": step, "temperature": temp, "correct": correct,
            "verified": verified, "prompt_tokens": prompt, "completion_tokens": completion,
            "verdict": {"stage": "ok" if correct else "value"},
            "timings": {"generate_s": 0.5, "guard_s": 0.0, "verify_s": 0.25}}


def test_task_round_and_run_aggregates():
    samples = [_rec("a", 0, 0, 0.4, True), _rec("a", 0, 0, 0.4, False), _rec("a", 0, 0, 1.0, False),
               _rec("b", 0, 0, 0.4, False), _rec("b", 0, 0, 0.4, False), _rec("b", 0, 0, 1.0, False, verified=False),
               _rec("b", 1, 0, 0.4, True), _rec("b", 1, 0, 0.4, True)]
    steps = [{"round": 0, "step": 0, "solved": ["a"], "seconds": 2.0}, {"round": 1, "step": 0, "solved": ["b"],
                                                                        "seconds": 1.0}]
    tm = task_metrics(samples)
    assert (tm["a"]["samples"], tm["a"]["correct"], tm["a"]["solved_at"]) == (3, 1, [0, 0])
    assert tm["a"]["pass@1"] == pytest.approx(1 / 3)
    assert tm["b"]["per_step"][0]["pass@3"] == 0.0 and tm["b"]["per_step"][1]["pass@2"] == 1.0
    assert tm["b"]["solved_at"] == [1, 0]
    # two requests per task-step share a prompt: (a, 0.4), (a, 1.0) -> 20 prompt tokens
    assert tm["a"]["prompt_tokens"] == 20 and tm["a"]["completion_tokens"] == 12
    assert tm["a"]["stages"] == {"ok": 1, "value": 2}
    rounds = round_metrics(samples, steps)
    assert [(r["round"], r["samples"], r["correct"], r["solved_total"]) for r in rounds] == [(0, 6, 1, 1), (1, 2, 2, 2)]
    run = run_metrics(samples, steps, n_tasks=3)
    assert (run["samples"], run["verifications"], run["tasks_solved"], run["requests"]) == (8, 7, 2, 5)
    assert run["task_completion"] == pytest.approx(2 / 3)
    assert run["wall_seconds"] == 3.0 and run["samples_per_second"] == pytest.approx(8 / 3)
    assert run["prompt_tokens"] == 50 and run["completion_tokens"] == 32
    assert task_completion({"a": 1, "b": 0}) == 0.5


def test_maintainability_with_and_without_comments():
    program = ("# bufferize the rows\nx = step.Bufferize(a=1).apply(E0)  # rows\n"
               "y = step.Map(fn=fn_gate).apply(x)\nreturn y\n")
    assert strip_comments(program) == "x = step.Bufferize(a=1).apply(E0)\ny = step.Map(fn=fn_gate).apply(x)\nreturn y\n"
    mi = maintainability(program, ["E0"])
    assert 0 <= mi["mi_no_comments"] <= 100 and 0 <= mi["mi"] <= 100
    assert mi["mi"] >= mi["mi_no_comments"]
    assert maintainability("this is ( not python", [])["mi"] is None
