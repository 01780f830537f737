"""The worker pool: parallel verdicts, time limits, crashes and resource limits never take the caller down."""

from __future__ import annotations

import os
import time

import pytest
from support import BLOW_UP

from stepforge.benchmark.pool import PoolError, VerifierPool
from stepforge.benchmark.schema import TaskFileError, load_benchmark

TASKS = load_benchmark()
TIMEOUT_S = 3.0


def with_fn(task, func_name: str, apply: str):
    fns = [f.model_copy(update={"apply": apply}) if f.func_name == func_name else f for f in task.fns]
    return task.model_copy(update={"fns": fns})


BASE = TASKS["norm/G_0_8_01"]
LOOPS = with_fn(BASE, "fn_sqrt", "while True:\n    pass\nreturn [input[0]]\n")
CRASHES = with_fn(BASE, "fn_sqrt", "import os\nos._exit(1)\nreturn [input[0]]\n")


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=TIMEOUT_S) as p:
        p.wait_ready()
        yield p


def test_every_reference_solution_passes_in_parallel(pool):
    keys = list(TASKS)
    verdicts = pool.verify_many([(k, None) for k in keys], timeout_s=60.0)  # cold caches on a busy machine
    assert [v.task for v in verdicts] == keys
    failed = {k: v.message for k, v in zip(keys, verdicts) if not v.passed}
    assert failed == {}
    pids = {w.process.pid for w in pool._workers}
    assert len(pids) == 2 and os.getpid() not in pids


def test_wrong_program_gets_its_verdict_from_a_worker(pool):
    impl = BASE.impl.replace("step.Repeat(n=D)", "step.Repeat(n=N)")
    verdict = pool.verify("norm/G_0_8_01", impl)
    assert verdict.stage == "type" and not verdict.passed


def test_endless_fn_times_out_and_the_pool_recovers(pool):
    restarts = pool.restarts
    t0 = time.monotonic()
    verdict = pool.verify(LOOPS)
    elapsed = time.monotonic() - t0
    assert verdict.stage == "timeout" and not verdict.passed and not verdict.functional_ok
    assert verdict.affine_ok is True  # filled in by parsing in the caller
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 4.0
    assert pool.restarts == restarts + 1
    assert pool.verify("norm/G_0_8_01").passed


def test_crashing_worker_is_a_runtime_verdict_and_the_pool_recovers(pool):
    verdict = pool.verify(CRASHES)
    assert verdict.stage == "runtime" and "crashed" in verdict.message and "exit code 1" in verdict.message
    assert pool.verify("rope/G_0_3_02").passed


def test_mixed_batch_keeps_job_order(pool):
    jobs = [(CRASHES, None), ("gemm/G_0_6_02", None), (LOOPS, None), ("bmm/bmm_0", None),
            ("rope/G_0_3_02", BLOW_UP), (BASE, "S0 = step.Map(fn=fn_square).apply(E0\n")]
    t0 = time.monotonic()
    verdicts = pool.verify_many(jobs)
    assert [v.stage for v in verdicts] == ["runtime", "ok", "timeout", "ok", "resource", "parse"]
    assert time.monotonic() - t0 < 2 * TIMEOUT_S + 6.0
    assert pool.verify_many([]) == []


def test_resource_limit_is_reported_not_allocated(pool):
    verdict = pool.verify("rope/G_0_3_02", BLOW_UP)
    assert verdict.stage == "resource" and "limit" in verdict.message
    short = pool.verify(LOOPS, timeout_s=0.5)
    assert short.stage == "timeout" and "0.5 s" in short.message
    # the limit is the caller's: a program within a raised limit is not a resource failure
    small = BLOW_UP.replace("33554432", "64")
    assert pool.verify("rope/G_0_3_02", small, max_elements=2**40).stage == "value"
    assert pool.verify("rope/G_0_3_02", small, max_elements=100).stage == "resource"


def test_broken_task_raises_in_the_caller(pool):
    outputs = [BASE.outputs[0].model_copy(update={"data_transform": "no_such_name\n"})]
    broken = BASE.model_copy(update={"outputs": outputs})
    with pytest.raises(TaskFileError, match="NameError"):
        pool.verify(broken)
    assert pool.verify("norm/G_0_8_01").passed


def test_unknown_key_and_closed_pool():
    with VerifierPool(workers=1, timeout_s=5.0, tasks={}) as small:
        with pytest.raises(KeyError):
            small.verify("norm/G_0_8_01")
        assert small.verify(BASE).passed  # a Task object needs no registry
    with pytest.raises(PoolError):
        small.verify(BASE)


def test_a_free_worker_takes_a_job_of_a_task_it_already_holds():
    from collections import deque

    from stepforge.benchmark.pool import _Worker

    pool = VerifierPool.__new__(VerifierPool)  # only the routing rule, no processes
    pool._pending = deque([0, 1, 2])
    resolved = [("a", None, ""), ("b", None, ""), ("c", None, "")]
    holder = _Worker(process=None, conn=None, known={"b"})
    assert pool._next_job_for(holder, resolved) == 1 and list(pool._pending) == [0, 2]
    assert pool._next_job_for(_Worker(process=None, conn=None), resolved) == 0 and list(pool._pending) == [2]
