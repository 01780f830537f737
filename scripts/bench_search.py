"""Benchmark of the search proposer on the benchmark's tasks (`--tasks`: a split, keys or globs; default all 58).

For each selected task (`load_benchmark()`), the search proposer's candidates are
verified in the order it makes them (`stepforge.benchmark.verifier.verify`)
until the first correct one; reported: solved or not, the time to the first
correct program (search + verification of every candidate before it),
candidates tried and search expansions. Two runs:

(a) cold: base knowledge only (no demonstrations);
(b) with the demonstrations of a previous run: the programs solved in (a)
    plus, to emulate a previous self-improvement run, the reference
    solutions of the OTHER tasks of the same group. A task never sees its own
    reference nor its own program from (a) (leave-one-out), so (b) measures
    transfer, not recall.

Budget per task and run: at most `--n` candidates, `--max-expansions` and
`--max-seconds` per candidate (the proposer's per-sample budget) and
`--task-seconds` in all. Temperature 0 (the prior's order), seed 0.

The last line is exactly
    search solved <A>/<T> cold, <B>/<T> with demonstrations, median <t>s per solved task
for T selected tasks, where the median is over the tasks solved cold.

    python scripts/bench_search.py [--tasks GLOB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from stepforge.benchmark.schema import Task, load_benchmark
from stepforge.benchmark.selection import select_option
from stepforge.benchmark.verifier import verify
from stepforge.errors import ConfigError
from stepforge.loop.interfaces import Demonstration, ProposalRequest
from stepforge.loop.search import SearchConfig, SearchProposer, SearchStats


@dataclass
class Attempt:
    task: str
    solved: bool
    seconds: float  # to the first correct program (or the whole attempt when unsolved)
    search_seconds: float
    verify_seconds: float
    candidates: int  # verified before stopping (the correct one included)
    expansions: int
    stopped: str  # why the attempt ended: solved / candidates / task-seconds / search budget
    program: Optional[str] = None
    demonstrations: list[str] = field(default_factory=list)


def attempt(proposer: SearchProposer, task: Task, demos: list[Demonstration], n: int, task_seconds: float) -> Attempt:
    request = ProposalRequest(task_key=task.key, task=task, demonstrations=demos,
                              n=n, temperature=0.0, seed=0)
    stats = SearchStats()
    start = time.perf_counter()
    verify_s = 0.0
    tried = 0
    stopped = ""
    program = None
    for cand in proposer.iter_candidates(request, stats):
        tried += 1
        t0 = time.perf_counter()
        verdict = verify(task, cand.text)
        verify_s += time.perf_counter() - t0
        if verdict.passed:
            program = cand.text
            stopped = "solved"
            break
        if time.perf_counter() - start > task_seconds:
            stopped = "task-seconds"
            break
    total = time.perf_counter() - start
    if not stopped:
        stopped = {"n": "candidates", "expansions": "search budget (expansions)",
                   "seconds": "search budget (seconds)", "exhausted": "search space exhausted"}.get(stats.stopped, stats.stopped)
    return Attempt(task.key, program is not None, total, total - verify_s, verify_s, tried, stats.expansions,
                   stopped, program, [d.task_key for d in demos])


def demonstrations_for(task: Task, tasks: dict[str, Task], earned: dict[str, str]) -> list[Demonstration]:
    """(a)'s programs of the other tasks, then the references of the other tasks of the same group."""
    demos = []
    for key, impl in earned.items():
        if key != task.key:
            demos.append(Demonstration(task_key=key, task=tasks[key], impl=impl))
    for key, other in tasks.items():
        if key != task.key and other.group == task.group and key not in earned and other.impl:
            demos.append(Demonstration(task_key=key, task=other, impl=other.impl))
    return demos


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="*",
                    help="task keys, globs (comma-separated) or a split: published, new, all (default: all)")
    ap.add_argument("--n", type=int, default=1000, help="most candidates verified per task and run")
    ap.add_argument("--max-expansions", type=int, default=6000,
                    help="search expansions per candidate and search of the proposer's portfolio")
    ap.add_argument("--max-seconds", type=float, default=10.0,
                    help="search seconds per candidate and search of the proposer's portfolio")
    ap.add_argument("--task-seconds", type=float, default=40.0, help="seconds per task and run (search + verify)")
    ap.add_argument("--json", default=None, help="also write every attempt to this JSON file")
    args = ap.parse_args(argv)

    tasks = load_benchmark()
    try:
        keys = select_option(args.tasks, tasks)
    except ConfigError as exc:
        ap.error(str(exc))  # exits 2 with the usage and the message
    config = SearchConfig(max_expansions=args.max_expansions, max_seconds=args.max_seconds)
    proposer = SearchProposer(config)
    print(f"search proposer benchmark: {len(keys)} tasks; per task and run at most {args.n} candidates, "
          f"{args.max_expansions} expansions and {args.max_seconds:g}s of search per candidate, "
          f"{args.task_seconds:g}s in all; temperature 0, seed 0", flush=True)

    cold: dict[str, Attempt] = {}
    print("\n(a) cold: base knowledge only", flush=True)
    _header()
    for key in keys:
        a = attempt(proposer, tasks[key], [], args.n, args.task_seconds)
        cold[key] = a
        _row(a, tasks[key])
    earned = {k: a.program for k, a in cold.items() if a.solved and a.program}

    warm: dict[str, Attempt] = {}
    print("\n(b) with demonstrations: the programs solved in (a) plus the reference solutions of the OTHER tasks "
          "of the same group (never the task's own reference or its own program from (a))", flush=True)
    _header(demos=True)
    for key in keys:
        demos = demonstrations_for(tasks[key], {k: tasks[k] for k in tasks}, earned)
        a = attempt(proposer, tasks[key], demos, args.n, args.task_seconds)
        warm[key] = a
        _row(a, tasks[key], demos)

    print("\nper task: expansions to the first correct program, cold -> with demonstrations", flush=True)
    for key in keys:
        c, w = cold[key], warm[key]
        cs = f"{c.expansions}" if c.solved else "unsolved"
        ws = f"{w.expansions}" if w.solved else "unsolved"
        print(f"  {key:28s} {cs:>9s} -> {ws:<9s}")

    solved_a = sum(a.solved for a in cold.values())
    solved_b = sum(a.solved for a in warm.values())
    t_cold = [a.seconds for a in cold.values() if a.solved]
    t_warm = [a.seconds for a in warm.values() if a.solved]
    med_cold = statistics.median(t_cold) if t_cold else 0.0
    med_warm = statistics.median(t_warm) if t_warm else 0.0
    unsolved = [k for k in keys if not cold[k].solved]
    print("\ntotals")
    print(f"  cold:                solved {solved_a}/{len(keys)}, median {med_cold:.2f}s per solved task, "
          f"{sum(a.seconds for a in cold.values()):.1f}s in all")
    print(f"  with demonstrations: solved {solved_b}/{len(keys)}, median {med_warm:.2f}s per solved task, "
          f"{sum(a.seconds for a in warm.values()):.1f}s in all")
    both = [k for k in keys if cold[k].solved and warm[k].solved]
    if both:
        fewer = sum(warm[k].expansions < cold[k].expansions for k in both)
        more = sum(warm[k].expansions > cold[k].expansions for k in both)
        print(f"  tasks solved in both runs: {len(both)}; demonstrations needed fewer expansions on {fewer}, "
              f"more on {more}; total expansions {sum(cold[k].expansions for k in both)} -> "
              f"{sum(warm[k].expansions for k in both)}")
    if unsolved:
        print("  unsolved cold: " + ", ".join(f"{k} ({cold[k].stopped}, {cold[k].candidates} candidates)" for k in unsolved))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cold": [asdict(a) for a in cold.values()], "demonstrations": [asdict(a) for a in warm.values()]},
                      fh, indent=1)
    print(f"search solved {solved_a}/{len(keys)} cold, {solved_b}/{len(keys)} with demonstrations, "
          f"median {med_cold:.2f}s per solved task")
    return 0


def _header(demos: bool = False) -> None:
    extra = f" {'demos':>5s}" if demos else ""
    print(f"  {'task':28s} {'lines':>5s} {'solved':>6s} {'time_s':>7s} {'search':>7s} {'verify':>7s} "
          f"{'cands':>5s} {'expans':>7s}{extra}  stopped", flush=True)


def _row(a: Attempt, task: Task, demos: Optional[list] = None) -> None:
    extra = f" {len(demos):5d}" if demos is not None else ""
    print(f"  {a.task:28s} {task.reference_lines():5d} {'yes' if a.solved else 'no':>6s} {a.seconds:7.2f} "
          f"{a.search_seconds:7.2f} {a.verify_seconds:7.2f} {a.candidates:5d} {a.expansions:7d}{extra}  {a.stopped}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
