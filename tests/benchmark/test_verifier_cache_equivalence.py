"""The verifier's caches and the simulator's batching shortcuts change no verdict.

Fast: the process-wide cache (warm: every candidate after the first of a task
reuses its fns, inputs and oracle outputs), the lean vmap, fn bodies called
on whole batches and folds run as one cumsum/cummax (simulator/reductions.py). Slow: `verify(..., cache=False)` under
`fast_batching(False)` (everything computed afresh, every batch through
`torch.func.vmap`, every fold step by step). Both must give the same stage and pass/fail for the
reference solutions, the mutation corpus (tests/mutations.py) and the
differential suite's generated programs.
"""

from __future__ import annotations

import random

import pytest
from mutations import mutations
from program_gen import OPS, RandomChooser, assert_same_streams, generate, run

from stepforge.benchmark.schema import load_benchmark
from stepforge.benchmark.verifier import cache_stats, clear_caches, verify
from stepforge.simulator import SimulatorError
from stepforge.simulator.batching import fast_batching

TASKS = load_benchmark()
MUTATIONS_PER_TASK = 3


def verdict_key(v):
    return (v.stage, v.passed, v.functional_ok, v.affine_ok, v.runs)


def both_ways(task, impl):
    fast = verify(task, impl)
    with fast_batching(False):
        slow = verify(task, impl, cache=False)
    return fast, slow


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(11)
    jobs = []
    for key, task in TASKS.items():
        jobs.append((key, task.impl))
        jobs.extend((key, impl) for impl in mutations(task.impl, rng, MUTATIONS_PER_TASK))
    return jobs


def test_references_and_mutations_get_the_same_verdicts(corpus):
    clear_caches()
    for key, _ in corpus:  # warm: later candidates of a task use what the first one cached
        verify(TASKS[key])
    hits = cache_stats()["hits"]
    stages = set()
    for key, impl in corpus:
        fast, slow = both_ways(TASKS[key], impl)
        assert verdict_key(fast) == verdict_key(slow), f"{key}\n{impl}\nfast: {fast.short()}\nslow: {slow.short()}"
        if impl == TASKS[key].impl:
            assert fast.passed and fast.message == slow.message, (key, fast.short(), slow.short())
        stages.add(fast.stage)
    assert cache_stats()["hits"] > hits  # the fast side did use the cache
    assert {"ok", "parse", "type"} <= stages and stages - {"ok", "parse", "type"}, stages


def _outcome(text, inputs, fns, binding):
    try:
        return run(text, inputs, fns, dict(binding), "vectorised")
    except SimulatorError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("seed", range(40))
def test_generated_programs_run_the_same_both_ways(seed):
    g = generate(RandomChooser(50_000 + seed), focus=OPS[seed % len(OPS)])
    fns = g.fns()
    fast = [_outcome(g.text, g.inputs, fns, g.binding) for _ in range(2)]  # the second with the trials made
    with fast_batching(False):
        slow = _outcome(g.text, g.inputs, g.fns(), g.binding)
    nai = run(g.text, g.inputs, g.fns(), dict(g.binding), "naive")
    for out in fast:
        assert not isinstance(out, str) and not isinstance(slow, str), (out, slow, g.text)
        assert_same_streams(out, slow, rtol=1e-6, atol=1e-6, where=g.text)
        assert_same_streams(out, nai, where=g.text)
