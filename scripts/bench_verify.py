"""Verified candidates per second: the in-process verifier against the pytest harness.

    python scripts/bench_verify.py [--tasks published] [--repeats 4] [--workers 2] [--harness-repeats 1] [--only SUBSTRING]

Candidates are the reference solutions of the selected tasks (`--tasks`: a
split, published / new / all, or keys and globs; default published, the 26
tasks the figures have always been measured on), each verified as a
candidate is: every size binding the task declares (and the defaults) with
seeds 0, 1, 2, at the default sizes. One core (torch.set_num_threads(1)).

Modes, one column each (`MODES`; a new mode is one more `Mode` there):

    verify    `verifier.verify` in this process, warm (after one pass over
              every task, as a long-lived worker is)
    pytest    the conventional harness: the candidate exported to a pytest
              file (`benchmark/export.py`) and `pytest.main` run on it, in this
              same warm process (so it shares the verifier's warm caches: the
              difference is the harness itself)
    open      `verifier.verify` in open mode (docs/language.md, section 5a): each
              task's own fns and impl posed as an open candidate, its fns
              interpreted in the fn language (`open_mode.verify_open`), warm,
              with the same caches

Then a VerifierPool of --workers workers on the same candidates (warm), closed
and then open. The
figures are wall-clock candidates per second (over all timed passes, and in
the fastest pass), with the CPU each candidate took (for the pool: in the
caller and in the workers), since other processes on a shared machine take
CPU from a run; the load average is printed too. The last three lines are

    open mode: <O>/s in one process (<Q>x closed), pool <P>/s (<R>x closed)

    pool of <W> workers: <X>/s, <S>x one process
    verify throughput <X>/s, pytest harness <Y>/s, ratio <R>x

Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

Job = tuple[str, object, str]  # (key, Task, program)
Runner = Callable[[Job], bool]  # verifies one candidate, True if it passed


@dataclass
class Mode:
    """One way of verifying candidates: `setup(jobs, seeds)` returns the runner (and may warm up)."""

    name: str
    label: str
    setup: Callable[[list[Job], tuple[int, ...]], Runner]
    repeats_arg: str = "repeats"  # which command-line count says how many passes to time


def _verify_mode(jobs: list[Job], seeds: tuple[int, ...]) -> Runner:
    from stepforge.benchmark.verifier import verify

    def run(job: Job) -> bool:
        return verify(job[1], job[2], seeds=seeds).passed

    for job in jobs:  # warm: every task's inputs and oracles computed once, as in a long-lived worker
        run(job)
    return run


def _pytest_mode(jobs: list[Job], seeds: tuple[int, ...]) -> Runner:
    import pytest

    from stepforge.benchmark.export import write_export

    folder = Path(tempfile.mkdtemp(prefix="stepforge-bench-"))
    counter = iter(range(10**9))

    def run(job: Job) -> bool:
        key, task, program = job
        path = write_export(task, program, folder / f"test_candidate_{next(counter)}.py", seeds=seeds)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = pytest.main([str(path), "-q", "-p", "no:cacheprovider",
                                "--rootdir", str(folder)])
        path.unlink()
        return code == 0

    run(jobs[0])  # warm: pytest's plugins imported once
    return run


def _open_mode(jobs: list[Job], seeds: tuple[int, ...]) -> Runner:
    from stepforge.benchmark.open_mode import reference_candidate, verify_open

    candidates = {key: reference_candidate(task) for key, task, _ in jobs}

    def run(job: Job) -> bool:
        return verify_open(job[1], candidates[job[0]], seeds=seeds).passed

    for job in jobs:  # warm, as for closed mode
        run(job)
    return run


MODES: list[Mode] = [
    Mode("verify", "verify", _verify_mode),
    Mode("open", "open mode", _open_mode),
    Mode("pytest", "pytest harness", _pytest_mode, repeats_arg="harness_repeats"),
]


@dataclass
class ModeFigures:
    rate: float  # candidates per second over all passes, wall clock
    best_rate: float  # in the fastest pass (least disturbed by other processes)
    cpu_ms: float  # CPU per candidate in this process
    candidates: int
    passed: int


def time_mode(mode: Mode, jobs: list[Job], seeds: tuple[int, ...], repeats: int) -> ModeFigures:
    """Throughput of `mode` over `repeats` timed passes of `jobs`."""
    runner = mode.setup(jobs, seeds)
    passed, passes = 0, []
    cpu0, t_all = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for job in jobs:
            passed += runner(job)
        passes.append(time.perf_counter() - t0)
    elapsed, cpu = time.perf_counter() - t_all, time.process_time() - cpu0
    n = repeats * len(jobs)
    return ModeFigures(n / elapsed, len(jobs) / min(passes), cpu / n * 1e3, n, passed)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class PoolFigures:
    rate: float  # candidates per second, wall clock
    passed: int
    caller_cpu_ms: float  # CPU per candidate in this process (dispatch, pipes, verdicts)
    worker_cpu_ms: float  # CPU per candidate in the workers, all together


def time_pool(jobs: list[Job], seeds: tuple[int, ...], workers: int, repeats: int,
              open_mode: bool = False) -> PoolFigures:
    """Throughput and CPU per candidate of a warm VerifierPool (open mode: the tasks' own fns as candidates)."""
    from stepforge.benchmark.open_mode import reference_candidate
    from stepforge.benchmark.pool import VerifierPool

    tasks = {key: task for key, task, _ in jobs}
    batch = [(key, reference_candidate(task) if open_mode else program) for key, task, program in jobs]
    with VerifierPool(workers=workers, tasks=tasks, verify_kwargs={"seeds": seeds}) as pool:
        pool.wait_ready()
        pool.verify_many(batch, timeout_s=120.0)  # warm every worker
        pool.verify_many(batch, timeout_s=120.0)
        pids = [w.process.pid for w in pool._workers]
        cpu0, worker0 = time.process_time(), sum(map(_cpu_seconds, pids))
        t0 = time.perf_counter()
        verdicts = pool.verify_many(batch * repeats, timeout_s=120.0)
        elapsed = time.perf_counter() - t0
        caller, worker = time.process_time() - cpu0, sum(map(_cpu_seconds, pids)) - worker0
    n = len(verdicts)
    return PoolFigures(n / elapsed, sum(v.passed for v in verdicts), caller / n * 1e3, worker / n * 1e3)


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4, help="timed passes over the candidates (in process, pool)")
    parser.add_argument("--harness-repeats", type=int, default=1, help="timed passes for the pytest harness")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", default="published",
                        help="a split (published, new, all) or comma-separated task keys and globs (default: published)")
    parser.add_argument("--only", default=None, help="only tasks whose key contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from stepforge.benchmark.schema import load_benchmark
    from stepforge.benchmark.selection import select_option
    from stepforge.benchmark.verifier import DEFAULT_SEEDS
    from stepforge.errors import ConfigError

    tasks = load_benchmark()
    try:
        keys = select_option(args.tasks, tasks)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2 with the usage and the message
    jobs = [(key, tasks[key], tasks[key].impl) for key in keys
            if tasks[key].impl and (args.only is None or args.only in key)]
    if not jobs:
        print("no reference solutions to verify")
        return 1
    seeds = tuple(DEFAULT_SEEDS)
    print(f"{len(jobs)} candidates (reference solutions of --tasks {args.tasks}), every binding x seeds {seeds}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread; {_load()}")

    figures: dict[str, ModeFigures] = {}
    print(f"{'mode':16s} {'candidates/s':>13s} {'best pass/s':>12s} {'CPU ms each':>12s} {'candidates':>11s} {'passed':>7s}")
    for mode in MODES:
        f = time_mode(mode, jobs, seeds, max(1, getattr(args, mode.repeats_arg)))
        figures[mode.name] = f
        print(f"{mode.label:16s} {f.rate:13.1f} {f.best_rate:12.1f} {f.cpu_ms:12.2f} {f.candidates:11d} {f.passed:7d}")
        sys.stdout.flush()

    pool = time_pool(jobs, seeds, args.workers, max(1, args.repeats))
    open_pool = time_pool(jobs, seeds, args.workers, max(1, args.repeats), open_mode=True)
    one, opened = figures["verify"], figures["open"]
    print(f"pool CPU per candidate: caller {pool.caller_cpu_ms:.2f} ms, workers {pool.worker_cpu_ms:.2f} ms "
          f"(one process: {one.cpu_ms:.2f} ms); {pool.passed} passed; {_load()}")
    print(f"open mode: {opened.rate:.1f}/s in one process ({opened.rate / one.rate:.2f}x closed), "
          f"pool {open_pool.rate:.1f}/s ({open_pool.rate / pool.rate:.2f}x closed); {open_pool.passed} passed")
    print(f"pool of {args.workers} workers: {pool.rate:.1f}/s, {pool.rate / one.rate:.2f}x one process")
    harness = figures["pytest"]
    print(f"verify throughput {one.rate:.1f}/s, pytest harness {harness.rate:.1f}/s, ratio {one.rate / harness.rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
