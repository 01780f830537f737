"""Measure verification throughput: in-process and through the worker pool.

    python scripts/bench_verifier.py [--workers 2] [--repeats 4] [--seeds 3] [--engine vectorised]

Verifies every benchmark task's reference solution: first once in-process per
task (cold: oracle and inputs computed; then warm: cached), then `repeats`
times each through a VerifierPool. Prints per-task warm milliseconds and the
pool's verifications per second. Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--engine", default="vectorised", choices=("vectorised", "naive"))
    args = parser.parse_args()

    from stepforge.benchmark.pool import VerifierPool
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.benchmark.verifier import verify

    tasks = load_benchmark()
    seeds = tuple(range(args.seeds))
    print(f"{'task':28s} {'cold ms':>9s} {'warm ms':>9s}  runs  result")
    warm_all = []
    for key, task in tasks.items():
        t0 = time.perf_counter()
        verify(task, seeds=seeds, engine=args.engine)
        cold = time.perf_counter() - t0
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            v = verify(task, seeds=seeds, engine=args.engine)
            samples.append(time.perf_counter() - t0)
        warm = statistics.median(samples)
        warm_all.append(warm)
        print(f"{key:28s} {cold * 1e3:9.1f} {warm * 1e3:9.1f} {v.runs:5d}  {v.stage}")
    print(f"in-process, warm: {len(tasks) / sum(warm_all):.1f} verifications/s (one process)")

    jobs = [(key, None) for key in tasks for _ in range(args.repeats)]
    t0 = time.perf_counter()
    with VerifierPool(workers=args.workers, verify_kwargs={"seeds": seeds, "engine": args.engine}) as pool:
        pool.wait_ready()
        started = time.perf_counter() - t0
        pool.verify_many([(key, None) for key in tasks])  # warm every worker's caches
        t1 = time.perf_counter()
        verdicts = pool.verify_many(jobs)
        elapsed = time.perf_counter() - t1
    passed = sum(v.passed for v in verdicts)
    print(f"pool of {args.workers}: started in {started:.2f} s; {len(jobs)} verifications in {elapsed:.2f} s "
          f"= {len(jobs) / elapsed:.1f}/s; {passed}/{len(jobs)} passed")


if __name__ == "__main__":
    main()
