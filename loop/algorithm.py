"""Algorithm 1: adaptive self-improvement over an executor that proposes, guards and verifies.

`SelfImprovementLoop` is the control flow of docs/design.md's Algorithm 1, and
nothing else: it decides which tasks to sample with which demonstrations,
hands the samples to an `Executor` (which proposes, guards and verifies),
and updates the buffer D and the unsolved set X from the verdicts::

    round 0: sample every task with base knowledge only (d = {})
    repeat (rounds 1, 2, ...):
        E = stratify(D, m)                     hardest group first
        for j = 0 .. len(E)-1:                 step j of the round
            d = E[0] + ... + E[j]              (capped; repeats skipped)
            sample every task in X with d, at every temperature, n each
            S = tasks with >= 1 correct sample (over all temperatures)
            if S: D += filter(B); X -= S; break
    until X is empty, or a full pass over the groups solved nothing new,
    or `max_rounds` rounds (round 0 included) have run

Groups come from `loop/buffer.py`: at most m non-empty groups of near-equal
size, so a buffer smaller than m has fewer steps per round, and an empty one
one step without demonstrations (a fresh sample of round 0's prompts). With
`max_demonstrations` the sets are capped (the hardest kept) and a set equal
to the previous one is skipped; a "full pass" is then the distinct sets.

Seeded buffer (`seed`, the config's `seed_buffer`): entries earned by
another run start D. They are demonstrations only: round 0 still has none;
from round 1 on they are stratified with the entries earned here. They are
never re-verified and never touch X; an entry for a task of this run is left
out (it would show the task its own answer). The store's buffer.jsonl holds
them first, marked by `source`; `LoopResult.buffer` and the state's `solved`
hold only what this run earned (`LoopResult.seeded` the seed).

The variants `single` and `agent` stop after round 0. A task's samples of
one step are merged over the temperatures: it is solved when any sample at
any temperature is correct, its buffer entry is the shortest correct program
among all of them (after AST deduplication), and its success rate is
correct / all its samples in that step (see `loop/buffer.py`).

Every sample's proposer seed derives from the config seed and the sample's
(round, step, task, temperature), so the whole run is a deterministic
function of the config (given a deterministic proposer and verifier). This
is what `--resume` uses: the loop replays from round 0, takes every sample
already in samples.jsonl instead of generating it, and continues where the
killed run stopped (see `loop/runstore.py`).

Repair turns (`repair_turns` k > 0): after a step's first answers, each
failed sample of a task the step has not solved goes back to the proposer
with its conversation and verdicts, up to k turns (`_repair`); a task solved
on any turn is solved, and its success rate counts every answer, turns
included. Budgets (`loop/budget.py`) stop the loop with state `budget`.

`run_algorithm1(tasks, proposer, guardian, verify, ...)` runs the loop in
process with a plain verify function (the tests use it with a scripted
proposer); `modes` (task key -> `closed` | `open`, default closed) poses each
task in its mode: an open task's samples, buffer entry and demonstrations
carry candidates (fns + impl YAML) instead of programs. The CLI's job around it (config, run directory, Ray, model pool,
verifier pool, summary and report) is `loop/job.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from stepforge.benchmark.schema import Task
from stepforge.loop.budget import BudgetMeter, BudgetReached
from stepforge.loop.buffer import ExperienceBuffer, demonstration_sets, earn
from stepforge.loop.candidates import check_mode
from stepforge.loop.executor import Executor, SampleJob, derive_seed
from stepforge.loop.interfaces import BufferEntry, Demonstration, Guardian, Proposer, RepairTurn
from stepforge.loop.progress import Events
from stepforge.loop.runstore import RunStore, SampleRecord, StepRecord, sample_key
from stepforge.loop.verifiers import InlineVerifier

SEED_SCHEME = "sha256('seed|round|step|task|temperature') -> 31 bits; guardian: sha256('job_seed|index|guard')"


@dataclass(frozen=True)
class LoopSettings:
    """The sampling budget and shape of Algorithm 1."""

    granularity: int = 3
    temperatures: tuple[float, ...] = (0.4, 0.7, 1.0)
    n: int = 4
    rounds_limit: int = 10  # rounds including round 0
    adaptive: bool = True  # False: round 0 only (variants single / agent)
    max_demonstrations: Optional[int] = None
    seed: int = 0
    repair_turns: int = 0  # follow-up turns per failed sample, the verdict shown (0: the published loop)


@dataclass(frozen=True)
class StepPlan:
    """What one step samples: the demonstrations (task keys, in prompt order) and the tasks."""

    round: int
    step: int
    demonstrations: tuple[str, ...]
    tasks: tuple[str, ...]


@dataclass
class StepResult:
    plan: StepPlan
    records: list[SampleRecord]
    solved: list[str]
    entries: list[BufferEntry]
    seconds: float


@dataclass
class LoopResult:
    buffer: list[BufferEntry]  # earned in this run (seeded entries are in `seeded`)
    unsolved: list[str]
    steps: list[StepResult]
    stop_reason: str
    rounds: int  # rounds run, round 0 included
    seeded: list[BufferEntry] = field(default_factory=list)  # the seed of D that was used

    @property
    def plans(self) -> list[StepPlan]:
        return [s.plan for s in self.steps]


class SelfImprovementLoop:
    """Algorithm 1 over `tasks` (task key -> Task), in key order.

    `seed`: buffer entries of another run that start D (demonstrations only,
    see the module docstring); `seed_tasks` maps their task keys to their tasks
    (needed for the prompts; default `tasks`).
    """

    def __init__(self, tasks: dict[str, Task], executor: Executor, settings: LoopSettings, *,
                 store: Optional[RunStore] = None, cached: Optional[dict[str, SampleRecord]] = None,
                 prompts: Optional[dict[str, list[dict[str, str]]]] = None, events: Optional[Events] = None,
                 seed: Sequence[BufferEntry] = (), seed_tasks: Optional[dict[str, Task]] = None,
                 modes: Optional[dict[str, str]] = None, budget: Optional[BudgetMeter] = None):
        if not tasks:
            raise ValueError("no tasks to run")
        self.tasks = dict(tasks)
        self.modes = {k: check_mode((modes or {}).get(k, "closed")) for k in self.tasks}
        self.seeded = [e for e in seed if e.task_key not in self.tasks]
        self.seed_skipped = [e.task_key for e in seed if e.task_key in self.tasks]
        self.demo_tasks = {**dict(seed_tasks or {}), **self.tasks}
        missing = [e.task_key for e in self.seeded if e.task_key not in self.demo_tasks]
        if missing:
            raise ValueError(f"seeded entries without a task IR: {', '.join(missing)}")
        self.seeded = [e if e.source else e.model_copy(update={"source": "seed"}) for e in self.seeded]
        self.order = {k: i for i, k in enumerate(tasks)}
        self.executor = executor
        self.settings = settings
        self.store = store
        self.cached = dict(cached or {})
        self.prompts: dict[str, list[dict[str, str]]] = dict(prompts or {})
        self.events = events or executor.events
        self.buffer = ExperienceBuffer(self.seeded)
        self.unsolved: list[str] = list(tasks)
        self.steps: list[StepResult] = []
        self.replayed_samples = 0
        self.new_samples = 0
        self.meter = budget or BudgetMeter()
        self._at = (0, 0)  # the (round, step) being sampled
        # the executor reports prompts through us (kept for buffer entries) to the store
        forward = executor.prompt_sink

        def keep_prompts(prompts: dict[str, list[dict[str, str]]]) -> None:
            self.prompts.update(prompts)
            if forward is not None:
                forward(prompts)

        executor.prompt_sink = keep_prompts

    # -- Algorithm 1 --------------------------------------------------------
    def run(self) -> LoopResult:
        """Algorithm 1 to its end, or to a spent budget (state `budget`, resumable with a larger one)."""
        try:
            return self._run()
        except BudgetReached as stop:
            rounds = self._at[0] + 1
            self._write_state(status="budget", round_=self._at[0], step=self._at[1], reason=stop.reason)
            return LoopResult(self.earned, list(self.unsolved), self.steps, stop.reason, rounds, list(self.seeded))

    def _run(self) -> LoopResult:
        s = self.settings
        if self.store is not None:
            self.store.write_buffer(self.seeded)  # replayed from round 0 on resume, like everything else
        self._step(0, 0, [])
        rounds = 1
        if not s.adaptive:
            reason = "variant runs round 0 only"
        else:
            reason = ""
            while True:
                if not self.unsolved:
                    reason = "all tasks solved"
                    break
                if rounds >= s.rounds_limit:
                    reason = f"max_rounds ({s.rounds_limit}) reached"
                    break
                groups = self.buffer.stratify(s.granularity)
                progress = False
                for j, demos in enumerate(demonstration_sets(groups, s.max_demonstrations)):
                    if self._step(rounds, j, demos):
                        progress = True
                        break
                rounds += 1
                if not progress:
                    reason = "a full pass over the demonstration groups solved nothing new"
                    break
        if not self.unsolved and s.adaptive:
            reason = "all tasks solved"
        self._write_state(status="done", round_=rounds - 1, step=self.steps[-1].plan.step, reason=reason)
        return LoopResult(self.earned, list(self.unsolved), self.steps, reason, rounds, list(self.seeded))

    @property
    def earned(self) -> list[BufferEntry]:
        """The entries of D earned in this run (D without the seed)."""
        return [e for e in self.buffer.entries if e.source is None]

    def _jobs(self, plan: StepPlan, demos) -> tuple[list[SampleJob], list[SampleRecord]]:
        """Jobs still to run, and the records already on disk for this step."""
        s = self.settings
        jobs: list[SampleJob] = []
        have_all: list[SampleRecord] = []
        demonstrations = ExperienceBuffer.demonstrations(demos, self.demo_tasks)
        for task in plan.tasks:
            for t in s.temperatures:
                seed = derive_seed(s.seed, plan.round, plan.step, task, float(t))
                have = {}
                for i in range(s.n):
                    rec = self.cached.get(sample_key(plan.round, plan.step, task, float(t), i))
                    if rec is not None:
                        have[i] = rec
                have_all.extend(have[i] for i in sorted(have))
                of = next(iter(have.values())).of if have else None
                if of is not None and all(i in have for i in range(of)):
                    continue
                jobs.append(SampleJob(round=plan.round, step=plan.step, task=task, spec=self.tasks[task],
                                      temperature=float(t), n=s.n, seed=seed, demonstrations=demonstrations,
                                      skip=frozenset(have), mode=self.modes[task]))
        return jobs, have_all

    def _step(self, round_: int, step: int, demos: Sequence[BufferEntry]) -> bool:
        """Sample X with demonstrations `demos`; update D and X. True when a task was solved."""
        s = self.settings
        plan = StepPlan(round_, step, tuple(e.task_key for e in demos), tuple(self.unsolved))
        self._write_state(status="running", round_=round_, step=step)
        started, t0 = time.time(), time.perf_counter()
        self._at = (round_, step)
        jobs, old = self._jobs(plan, demos)
        total = len(plan.tasks) * len(s.temperatures) * s.n
        self.events.step_started(round_, step, plan.demonstrations, plan.tasks, total, len(old),
                                 sum(1 for r in old if r.correct))
        new = self._execute(jobs, old, solved={r.task for r in old if r.correct})
        t_index = {float(t): i for i, t in enumerate(s.temperatures)}
        first = sorted(old + new, key=lambda r: (self.order[r.task], t_index[float(r.temperature)], r.index))
        demonstrations = ExperienceBuffer.demonstrations(demos, self.demo_tasks)
        records = first + self._repair(plan, demonstrations, first)
        by_task: dict[str, list[SampleRecord]] = {}
        for rec in records:
            by_task.setdefault(rec.task, []).append(rec)
        solved, entries = [], []
        for task in plan.tasks:
            recs = by_task.get(task, [])
            correct = [(r.guarded, float(r.temperature), self.prompts.get(r.prompt_id) if r.prompt_id else None)
                       for r in recs if r.correct and r.guarded]
            if correct:
                solved.append(task)
                entries.append(earn(task, correct, len(recs), round_, step, plan.demonstrations,
                                    mode=self.modes[task]))
        for entry in entries:
            self.buffer.add(entry)
        self.unsolved = [t for t in self.unsolved if t not in set(solved)]
        seconds = time.perf_counter() - t0
        result = StepResult(plan, records, solved, entries, seconds)
        self.steps.append(result)
        if self.store is not None:
            if entries:
                self.store.write_buffer(self.buffer.entries)
            self.store.append_step(StepRecord(round=round_, step=step, demonstrations=list(plan.demonstrations),
                                              tasks=list(plan.tasks), solved=solved, samples=len(records),
                                              correct=sum(1 for r in records if r.correct),
                                              seconds=round(seconds, 4), started=started, finished=time.time()))
        self.events.step_finished(round_, step, solved, len(self.unsolved))
        return bool(solved)

    # -- execution under the budget, and repair turns ------------------------
    def _execute(self, jobs: list[SampleJob], old: list[SampleRecord],
                 solved: frozenset[str] | set[str] = frozenset()) -> list[SampleRecord]:
        """Run `jobs` (after counting `old`, the records replayed from disk) within the budget;
        `solved`: tasks already solved in the step (a streaming proposer stops sampling them)."""
        self.meter.add(old)
        self.replayed_samples += len(old)
        if jobs and self.meter.spent():
            raise BudgetReached(self.meter.spent())
        jobs, cut = self.meter.trim(jobs)
        new = self.executor.run(jobs, solved=set(solved)) if jobs else []
        self.meter.add(new)
        self.new_samples += len(new)
        if cut:
            raise BudgetReached(self.meter.samples_reason())
        if jobs and self.meter.spent():
            raise BudgetReached(self.meter.spent())
        return new

    def _repair(self, plan: StepPlan, demonstrations: list[Demonstration],
                first: list[SampleRecord]) -> list[SampleRecord]:
        """Up to `repair_turns` follow-ups per failed first-turn sample of a task the step has not solved yet:
        each shows the proposer its conversation so far with the verdicts. Returns the follow-up records."""
        k = self.settings.repair_turns
        if k <= 0 or not getattr(self.executor.proposer, "takes_feedback", True):
            return []
        chains = [[r] for r in first]
        added: list[SampleRecord] = []
        for turn in range(1, k + 1):
            solved = {r.task for r in first + added if r.correct}
            open_ = [c for c in chains if not c[-1].correct and c[-1].task not in solved
                     and c[-1].verdict.stage not in ("generate", "pending")]
            if not open_:
                break
            jobs, old, by_key = [], [], {}
            for chain in open_:
                last, root = chain[-1], chain[0]
                rec = self.cached.get(sample_key(plan.round, plan.step, last.task, float(last.temperature),
                                                 last.index, turn))
                if rec is not None:
                    old.append(rec)
                    chain.append(rec)
                    continue
                by_key[(last.task, float(last.temperature), last.index)] = chain
                jobs.append(SampleJob(
                    round=plan.round, step=plan.step, task=last.task, spec=self.tasks[last.task],
                    temperature=float(last.temperature), n=1, demonstrations=demonstrations,
                    seed=derive_seed(root.seed, root.index, "repair", turn), turn=turn, index=last.index,
                    parent=last.key, mode=self.modes[last.task],
                    history=[RepairTurn(reply=r.raw, program=r.guarded, verdict=r.verdict) for r in chain]))
            for rec in self._execute(jobs, old):
                by_key[(rec.task, float(rec.temperature), rec.index)].append(rec)
            added.extend(c[-1] for c in open_ if len(c) == turn + 1)  # chain order, replayed or not
        return added

    def _write_state(self, status: str, round_: int, step: int, reason: str = "") -> None:
        if self.store is None:
            return
        self.store.write_state({
            "status": status,
            "round": round_,
            "step": step,
            "unsolved": list(self.unsolved),
            "solved": [e.task_key for e in self.earned],
            "steps_done": [[r.plan.round, r.plan.step] for r in self.steps],
            "seed": self.settings.seed,
            "seed_scheme": SEED_SCHEME,
            "stop_reason": reason,
            **({"modes": self.modes} if any(m != "closed" for m in self.modes.values()) else {}),
            **({"seeded": [e.task_key for e in self.seeded], "seed_skipped": self.seed_skipped}
               if self.seeded or self.seed_skipped else {}),
        })


def run_algorithm1(tasks: dict[str, Task], proposer: Proposer, guardian: Optional[Guardian],
                   verify: Callable[[str, str], Any], settings: LoopSettings = LoopSettings(), *,
                   extract: Optional[Callable[[str], Optional[str]]] = None, chunk_size: int = 8,
                   events: Optional[Events] = None, seed: Sequence[BufferEntry] = (),
                   seed_tasks: Optional[dict[str, Task]] = None,
                   modes: Optional[dict[str, str]] = None) -> LoopResult:
    """Algorithm 1 in this process: `verify(task_key, program)` returns a Verdict-like object
    (for an open task `verify(task_key, candidate, "open")`).

    `seed` / `seed_tasks`: a seeded D; `modes`: each task's mode (see `SelfImprovementLoop`)."""
    executor = Executor(proposer, guardian, InlineVerifier(verify), extract=extract, chunk_size=chunk_size,
                        events=events)
    try:
        return SelfImprovementLoop(tasks, executor, settings, events=events, seed=seed, seed_tasks=seed_tasks,
                                   modes=modes).run()
    finally:
        executor.close()


def settings_from_config(cfg) -> LoopSettings:
    """The loop settings of an experiment config."""
    return LoopSettings(granularity=cfg.granularity, temperatures=tuple(float(t) for t in cfg.temperatures),
                        n=cfg.n, rounds_limit=cfg.rounds_limit, adaptive=cfg.adaptive,
                        max_demonstrations=cfg.max_demonstrations, seed=cfg.seed,
                        repair_turns=cfg.repair_turns)


__all__ = [
    "LoopResult",
    "LoopSettings",
    "SelfImprovementLoop",
    "StepPlan",
    "StepResult",
    "run_algorithm1",
    "settings_from_config",
]
