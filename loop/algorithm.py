"""Algorithm 1 (adaptive self-improvement) and the `stepforge improve` job around it.

`SelfImprovementLoop` is the control flow of DESIGN.md's Algorithm 1, and
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

`run_algorithm1(tasks, proposer, guardian, verify, ...)` runs the loop in
process with a plain verify function (the tests use it with a scripted
proposer); `run_improve(...)` is the CLI's job: config, run directory,
Ray, model pool, verifier pool, summary and report.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from stepforge.loop.buffer import ExperienceBuffer, demonstration_sets, earn
from stepforge.loop.executor import Events, Executor, InlineVerifier, SampleJob, derive_seed
from stepforge.loop.interfaces import BufferEntry, Guardian, Proposer
from stepforge.loop.runstore import RunStore, SampleRecord, StepRecord, sample_key

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
    """Algorithm 1 over `task_irs` (task key -> structural IR without impl), in key order.

    `seed`: buffer entries of another run that start D (demonstrations only,
    see the module docstring); `seed_irs` maps their task keys to their IRs
    (needed for the prompts; default `task_irs`).
    """

    def __init__(self, task_irs: dict[str, str], executor: Executor, settings: LoopSettings, *,
                 store: Optional[RunStore] = None, cached: Optional[dict[str, SampleRecord]] = None,
                 prompts: Optional[dict[str, list[dict[str, str]]]] = None, events: Optional[Events] = None,
                 seed: Sequence[BufferEntry] = (), seed_irs: Optional[dict[str, str]] = None):
        if not task_irs:
            raise ValueError("no tasks to run")
        self.task_irs = dict(task_irs)
        self.seeded = [e for e in seed if e.task_key not in self.task_irs]
        self.seed_skipped = [e.task_key for e in seed if e.task_key in self.task_irs]
        self.demo_irs = {**dict(seed_irs or {}), **self.task_irs}
        missing = [e.task_key for e in self.seeded if e.task_key not in self.demo_irs]
        if missing:
            raise ValueError(f"seeded entries without a task IR: {', '.join(missing)}")
        self.seeded = [e if e.source else e.model_copy(update={"source": "seed"}) for e in self.seeded]
        self.order = {k: i for i, k in enumerate(task_irs)}
        self.executor = executor
        self.settings = settings
        self.store = store
        self.cached = dict(cached or {})
        self.prompts: dict[str, list[dict[str, str]]] = dict(prompts or {})
        self.events = events or executor.events
        self.buffer = ExperienceBuffer(self.seeded)
        self.unsolved: list[str] = list(task_irs)
        self.steps: list[StepResult] = []
        self.replayed_samples = 0
        self.new_samples = 0
        # the executor reports prompts through us (kept for buffer entries) to the store
        forward = executor.prompt_sink

        def keep_prompts(prompts: dict[str, list[dict[str, str]]]) -> None:
            self.prompts.update(prompts)
            if forward is not None:
                forward(prompts)

        executor.prompt_sink = keep_prompts

    # -- Algorithm 1 --------------------------------------------------------
    def run(self) -> LoopResult:
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
        demonstrations = ExperienceBuffer.demonstrations(demos, self.demo_irs)
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
                jobs.append(SampleJob(round=plan.round, step=plan.step, task=task, task_ir=self.task_irs[task],
                                      temperature=float(t), n=s.n, seed=seed, demonstrations=demonstrations,
                                      skip=frozenset(have)))
        return jobs, have_all

    def _step(self, round_: int, step: int, demos: Sequence[BufferEntry]) -> bool:
        """Sample X with demonstrations `demos`; update D and X. True when a task was solved."""
        s = self.settings
        plan = StepPlan(round_, step, tuple(e.task_key for e in demos), tuple(self.unsolved))
        self._write_state(status="running", round_=round_, step=step)
        started, t0 = time.time(), time.perf_counter()
        jobs, old = self._jobs(plan, demos)
        total = len(plan.tasks) * len(s.temperatures) * s.n
        self.events.step_started(round_, step, plan.demonstrations, plan.tasks, total, len(old),
                                 sum(1 for r in old if r.correct))
        new = self.executor.run(jobs)
        self.replayed_samples += len(old)
        self.new_samples += len(new)
        t_index = {float(t): i for i, t in enumerate(s.temperatures)}
        records = sorted(old + new, key=lambda r: (self.order[r.task], t_index[float(r.temperature)], r.index))
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
                entries.append(earn(task, correct, len(recs), round_, step, plan.demonstrations))
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
            **({"seeded": [e.task_key for e in self.seeded], "seed_skipped": self.seed_skipped}
               if self.seeded or self.seed_skipped else {}),
        })


def run_algorithm1(tasks: dict[str, str], proposer: Proposer, guardian: Optional[Guardian],
                   verify: Callable[[str, str], Any], settings: LoopSettings = LoopSettings(), *,
                   extract: Optional[Callable[[str], Optional[str]]] = None, chunk_size: int = 8,
                   events: Optional[Events] = None, seed: Sequence[BufferEntry] = (),
                   seed_irs: Optional[dict[str, str]] = None) -> LoopResult:
    """Algorithm 1 in this process: `verify(task_key, program)` returns a Verdict-like object.

    `seed` / `seed_irs`: a seeded D (see `SelfImprovementLoop`)."""
    executor = Executor(proposer, guardian, InlineVerifier(verify), extract=extract, chunk_size=chunk_size,
                        events=events)
    try:
        return SelfImprovementLoop(tasks, executor, settings, events=events, seed=seed, seed_irs=seed_irs).run()
    finally:
        executor.close()


# ---------------------------------------------------------------------------
# the `stepforge improve` job


class ImproveError(RuntimeError):
    """An expected failure of the improve job (shown as one line by the CLI)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: `run_dir` is the directory to `--resume`."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def settings_from_config(cfg) -> LoopSettings:
    return LoopSettings(granularity=cfg.granularity, temperatures=tuple(float(t) for t in cfg.temperatures),
                        n=cfg.n, rounds_limit=cfg.rounds_limit, adaptive=cfg.adaptive,
                        max_demonstrations=cfg.max_demonstrations, seed=cfg.seed)


@dataclass
class Components:
    """Everything a run holds open: proposer, guardian, verifier backend, model pools."""

    proposer: Proposer
    guardian: Optional[Guardian]
    verifier: Any
    closers: list[Callable[[], None]] = field(default_factory=list)
    token_counter: Optional[Callable[[str], int]] = None

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.closers = []


def _import_factory(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImproveError(f"proposer.factory: cannot import {spec!r}: {exc}") from None


def build_components(cfg, tasks: dict[str, Any], where: str = "config") -> Components:
    """The proposer, guardian and verifier a config asks for (Ray and models started as needed).

    `where` names the config file in errors.
    """
    cfg = cfg.effective()
    closers: list[Callable[[], None]] = []
    pools: dict[str, Any] = {}

    def model_pool(backend) -> Any:
        key = backend.model_dump_json()
        if key not in pools:
            from stepforge.serve.actors import ModelPool

            pool = ModelPool(backend, replicas=cfg.proposer.replicas, address=cfg.ray.address)
            pools[key] = pool
            closers.append(pool.close)
        return pools[key]

    if cfg.proposer.resolved_kind == "llm":  # check the options before Ray or a model starts
        import inspect

        from stepforge.loop.agents.proposer import LLMProposer

        settings = {"style": cfg.proposer.style, "max_tokens": cfg.proposer.max_tokens,
                    "stop": cfg.proposer.stop or None, "top_p": cfg.proposer.top_p, **cfg.proposer.options}
        try:
            inspect.signature(LLMProposer).bind(None, None, **settings)
        except TypeError as exc:
            raise ImproveError(f"{where}: proposer.options: not an option of the LLM proposer: {exc}") from None
    try:
        if cfg.uses_ray():
            from stepforge.serve.actors import init_ray

            try:
                init_ray(cfg.ray.address, cfg.ray.num_cpus)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
                target = cfg.ray.address or "a local instance"
                raise ImproveError(f"ray: cannot start or join {target}: {exc}".splitlines()[0]) from None
        kind = cfg.proposer.resolved_kind
        if kind == "search":
            from pydantic import ValidationError

            from stepforge.loop.config import ConfigError, format_errors
            from stepforge.loop.search import SearchConfig, SearchProposer

            try:
                proposer = SearchProposer(cfg.proposer.options)
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, where, prefix="proposer.options", model=SearchConfig)) from None
        elif kind == "custom":
            proposer = _import_factory(cfg.proposer.factory)(cfg, tasks)
        else:
            from stepforge.loop.agents.proposer import LLMProposer
            from stepforge.loop.agents.knowledge import load_knowledge

            proposer = LLMProposer(model_pool(cfg.proposer.backend), load_knowledge(variant=cfg.proposer.knowledge),
                                   **settings)
        guardian = None
        if cfg.guardian.kind != "none":
            from stepforge.loop.agents.guardians import make_guardian

            if cfg.guardian.kind == "llm":
                guardian = make_guardian("llm", backend=model_pool(cfg.guardian_backend()),
                                         max_tokens=cfg.guardian.max_tokens)
            else:
                guardian = make_guardian(cfg.guardian.kind)
        verifier = build_verifier(cfg, tasks)
        closers.append(verifier.close)
        return Components(proposer, guardian, verifier, closers)
    except BaseException:
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
        raise


def build_verifier(cfg, tasks: dict[str, Any]):
    """The verifier backend of `cfg.verifier.kind` (auto: Ray actors when Ray runs generation)."""
    from stepforge.loop.executor import PoolVerifier, RayVerifier

    v = cfg.verifier
    verify_kwargs = {"seeds": tuple(v.seeds), "check_affine": v.check_affine}
    kind = v.kind
    if kind == "auto":
        kind = "ray" if cfg.uses_ray() else "pool"
    if kind == "ray":
        return RayVerifier(v.workers, v.timeout_s, verify_kwargs, num_cpus=v.num_cpus)
    if kind == "inline":
        from stepforge.benchmark.verifier import verify

        return InlineVerifier(lambda key, program: verify(tasks[key], program, **verify_kwargs))
    from stepforge.benchmark.pool import VerifierPool

    return PoolVerifier(VerifierPool(v.workers, v.timeout_s, tasks=tasks, verify_kwargs=verify_kwargs))




# ---------------------------------------------------------------------------
# the job: config -> run directory -> loop -> summary and report


@dataclass
class ImproveOutcome:
    run_dir: Path
    summary: dict[str, Any]
    result: Optional[LoopResult]  # None when a resumed run had already finished
    new_samples: int = 0
    replayed_samples: int = 0


def ensure_tiny_model(path: str | Path) -> Path:
    """Build the tiny random test model at `path` unless a model is already there."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        from stepforge.serve.tiny_model import build_tiny_model

        build_tiny_model(path)
    return path


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _make_events(cfg, n_tasks: int, progress: Optional[bool]) -> Events:
    import sys

    from stepforge.loop.executor import LogProgress, RichProgress

    show = cfg.progress if progress is None else progress
    if not show:
        return Events()
    if sys.stderr.isatty():
        return RichProgress(n_tasks)
    return LogProgress(n_tasks)


def load_seed(cfg, benchmark_keys: Sequence[str], where: str = "config",
              store: Optional[RunStore] = None) -> list[BufferEntry]:
    """The seeded entries of `cfg.seed_buffer` (none for a non-adaptive variant).

    A run directory keeps the seed it started with (seed_buffer.jsonl): a
    resumed run reads that copy, never the source again.
    """
    from stepforge.loop.buffer import SeedBufferError, read_seed_buffer
    from stepforge.loop.config import ConfigError
    from stepforge.loop.runstore import SEED_BUFFER

    if not cfg.seed_buffer or not cfg.adaptive:
        return []
    snapshot = store.path(SEED_BUFFER) if store is not None else None
    source = snapshot if snapshot is not None and snapshot.is_file() else cfg.seed_buffer
    try:
        entries = read_seed_buffer(source)
    except SeedBufferError as exc:
        raise ConfigError(f"{where}: seed_buffer: {exc}") from None
    known = set(benchmark_keys)
    unknown = [e.task_key for e in entries if e.task_key not in known]
    if unknown:
        raise ConfigError(f"{where}: seed_buffer: entries of tasks that are not in the benchmark: "
                          f"{', '.join(unknown)}")
    return entries


def _save_seed(store: RunStore, entries: Sequence[BufferEntry]) -> None:
    from stepforge.loop.runstore import SEED_BUFFER, atomic_write_text

    if entries and not store.path(SEED_BUFFER).is_file():
        atomic_write_text(store.path(SEED_BUFFER), "".join(e.model_dump_json() + "\n" for e in entries))


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def run_improve(config_path: Optional[str | Path] = None, *, run_dir: Optional[str | Path] = None,
                resume: Optional[str | Path] = None, overrides: Sequence[str] = (),
                progress: Optional[bool] = None) -> ImproveOutcome:
    """`stepforge improve`: a new run (config + overrides) or `resume` of a run directory."""
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop import config as C
    from stepforge.loop.reporting.report import write_report
    from stepforge.loop.runstore import CONFIG, atomic_write_text

    overrides = list(overrides)
    if resume is not None:
        if config_path is not None:
            raise C.ConfigError("--resume continues a run with its own config.yaml; leave out --config")
        C.check_resume_overrides(overrides)
        store = RunStore.open(resume)
        where = str(store.path(CONFIG))
        try:
            data, keys = C.apply_overrides(C.read_yaml(store.path(CONFIG)), overrides)
            cfg = C.config_from_dict(data, where, keys)
        except BaseException:
            store.close()
            raise
        if overrides:
            atomic_write_text(store.path(CONFIG), cfg.to_yaml())
    else:
        cfg = C.resolve_model_paths(C.load_config(config_path, overrides))
        where = str(config_path) if config_path is not None else "config"
        store = None
    try:
        tasks_all = load_benchmark()
        keys = C.select_tasks(cfg.tasks, list(tasks_all), where)
        if cfg.proposer.tiny_model and cfg.proposer.backend is not None:
            ensure_tiny_model(cfg.proposer.backend.model)
        C.check_model_paths(cfg, where)
        if store is not None and store.load_state().get("status") == "done":
            summary = write_report(store.root, store)
            return ImproveOutcome(store.root, summary, None)
        new_dir = Path(run_dir or default_run_dir(cfg.name))
        if store is None:
            RunStore.check_new(new_dir)  # before any model starts
        tasks = {k: tasks_all[k] for k in keys}
        task_irs = {k: t.to_yaml(include_impl=False, include_meta=False) for k, t in tasks.items()}
        seed = load_seed(cfg, list(tasks_all), where, store)
        seed_irs = {e.task_key: tasks_all[e.task_key].to_yaml(include_impl=False, include_meta=False) for e in seed}
        ray_was_running = _ray_running()
        components = build_components(cfg, tasks, where)
        try:
            if store is None:
                store = RunStore.create(new_dir, cfg.to_yaml())
            _save_seed(store, seed)
            cached, _ = store.prepare_resume()
            prompts = store.load_prompts()
        except BaseException:
            components.close()
            raise
        events = _make_events(cfg, len(keys), progress)
        executor = Executor(components.proposer, components.guardian, components.verifier,
                            chunk_size=cfg.chunk_size, guard_temperature=cfg.guardian.temperature,
                            sink=store.append_samples, prompt_sink=store.add_prompts, events=events)
        try:
            loop = SelfImprovementLoop(task_irs, executor, settings_from_config(cfg), store=store, cached=cached,
                                       prompts=prompts, events=events, seed=seed, seed_irs=seed_irs)
            result = loop.run()
        finally:
            events.close()
            executor.close()
            components.close()
            if not ray_was_running and _ray_running():
                import ray

                ray.shutdown()  # a local instance this run started
        summary = write_report(store.root, store)
        return ImproveOutcome(store.root, summary, result, loop.new_samples, loop.replayed_samples)
    except KeyboardInterrupt:
        if store is None:
            raise
        raise Interrupted(store.root) from None
    finally:
        if store is not None:
            store.close()


__all__ = [
    "Components",
    "ImproveError",
    "ImproveOutcome",
    "Interrupted",
    "LoopResult",
    "LoopSettings",
    "SelfImprovementLoop",
    "StepPlan",
    "StepResult",
    "build_components",
    "build_verifier",
    "default_run_dir",
    "ensure_tiny_model",
    "load_seed",
    "run_algorithm1",
    "run_improve",
    "settings_from_config",
]
