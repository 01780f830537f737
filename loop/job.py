"""The `stepforge improve` job: config -> run directory -> components -> Algorithm 1 -> summary and report.

`run_improve` is a straight line: read the config (or the run's own, on
`--resume`), select the tasks, check model paths, open the run directory,
start the components (Ray, model pools, proposer, guardian, verifier) and
run `SelfImprovementLoop`. Everything opened is registered on one
`contextlib.ExitStack`, so it is closed in reverse order however the run
ends (done, an expected error, Ctrl-C).

Proposers and guardians are chosen by name (`PROPOSERS`, and
`loop/agents/guardians.py`'s `GUARDIANS`), verifier backends by
`loop/verifiers.py`'s `VERIFIERS`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from stepforge.errors import ConfigError, StepforgeError
from stepforge.loop.algorithm import LoopResult, SelfImprovementLoop, settings_from_config
from stepforge.loop.budget import BudgetMeter
from stepforge.loop.executor import Executor
from stepforge.loop.interfaces import BufferEntry, Guardian, Proposer
from stepforge.loop.progress import Events
from stepforge.loop.runstore import RunStore
from stepforge.registry import Registry


class ImproveError(StepforgeError):
    """An expected failure of the improve job (shown as one line by the CLI)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: `run_dir` is the directory to `--resume`."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@dataclass
class ImproveOutcome:
    """What `run_improve` returns: the run directory, its summary and the loop's result."""

    run_dir: Path
    summary: dict[str, Any]
    result: Optional[LoopResult]  # None when a resumed run had already finished
    new_samples: int = 0
    replayed_samples: int = 0


# ---------------------------------------------------------------------------
# components


@dataclass
class Components:
    """The proposer, guardian and verifier backend of a run (their resources sit on the job's ExitStack)."""

    proposer: Proposer
    guardian: Optional[Guardian]
    verifier: Any


class _ModelPools:
    """One Ray `ModelPool` per distinct backend config (the proposer and an LLM guardian may share one)."""

    def __init__(self, cfg, stack: contextlib.ExitStack):
        self.cfg, self.stack, self.pools = cfg, stack, {}

    def __call__(self, backend) -> Any:
        key = backend.model_dump_json()
        if key not in self.pools:
            from stepforge.serve.actors import ModelPool

            pool = ModelPool(backend, replicas=self.cfg.proposer.replicas, address=self.cfg.ray.address)
            self.stack.callback(pool.close)
            self.pools[key] = pool
        return self.pools[key]


def _llm_settings(cfg) -> dict[str, Any]:
    return {"style": cfg.proposer.style, "max_tokens": cfg.proposer.max_tokens, "stop": cfg.proposer.stop or None,
            "top_p": cfg.proposer.top_p, **cfg.proposer.options}


def check_proposer_options(cfg, where: str = "config") -> None:
    """The proposer's options are valid (checked before Ray or a model starts)."""
    if cfg.proposer.resolved_kind == "llm":
        from stepforge.loop.agents.proposer import LLMProposer

        try:
            inspect.signature(LLMProposer).bind(None, None, **_llm_settings(cfg))
        except TypeError as exc:
            raise ImproveError(f"{where}: proposer.options: not an option of the LLM proposer: {exc}") from None
    elif cfg.proposer.resolved_kind == "search":
        from pydantic import ValidationError

        from stepforge.config_io import format_problems
        from stepforge.loop.search import SearchConfig

        try:
            SearchConfig.model_validate(cfg.proposer.options)
        except ValidationError as exc:
            raise ConfigError(format_problems(exc, where, SearchConfig, prefix="proposer.options")) from None


def _search_proposer(cfg, tasks, models, where):
    from stepforge.loop.search import SearchProposer

    return SearchProposer(cfg.proposer.options)


def _llm_proposer(cfg, tasks, models, where):
    from stepforge.loop.agents.knowledge import load_knowledge
    from stepforge.loop.agents.proposer import LLMProposer

    return LLMProposer(models(cfg.proposer.backend), load_knowledge(variant=cfg.proposer.knowledge),
                       **_llm_settings(cfg))


def _custom_proposer(cfg, tasks, models, where):
    spec = cfg.proposer.factory
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImproveError(f"{where}: proposer.factory: cannot import {spec!r}: {exc}") from None
    try:
        inspect.signature(factory).bind(cfg, tasks)
    except (TypeError, ValueError):
        raise ImproveError(f"{where}: proposer.factory: {spec!r} must be a callable taking (config, tasks)") from None
    proposer = factory(cfg, tasks)
    if not isinstance(proposer, Proposer):
        raise ImproveError(f"{where}: proposer.factory: {spec!r} returned {type(proposer).__name__}, not a Proposer")
    return proposer


PROPOSERS: Registry[Callable[..., Proposer]] = Registry("proposer kind", {
    "search": _search_proposer, "llm": _llm_proposer, "custom": _custom_proposer})


def start_ray(cfg) -> None:
    """Start or join Ray when the config runs anything on it."""
    from stepforge.serve.actors import init_ray

    try:
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
    except ConfigError:
        raise
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        target = cfg.ray.address or "a local instance"
        raise ImproveError(f"ray: cannot start or join {target}: {exc}".splitlines()[0]) from None


def build_components(cfg, tasks: dict[str, Any], stack: contextlib.ExitStack, where: str = "config") -> Components:
    """The proposer, guardian and verifier a config asks for; what they hold open goes on `stack`.

    `where` names the config file in errors.
    """
    from stepforge.loop.agents.guardians import make_guardian

    cfg = cfg.effective()
    check_proposer_options(cfg, where)
    if cfg.uses_ray():
        start_ray(cfg)
    models = _ModelPools(cfg, stack)
    proposer = PROPOSERS.create(cfg.proposer.resolved_kind, cfg, tasks, models, where)
    guardian = None
    if cfg.guardian.kind == "llm":
        guardian = make_guardian("llm", backend=models(cfg.guardian_backend()), max_tokens=cfg.guardian.max_tokens)
    elif cfg.guardian.kind != "none":
        guardian = make_guardian(cfg.guardian.kind)
    verifier = build_verifier(cfg, tasks)
    stack.callback(verifier.close)
    return Components(proposer, guardian, verifier)


def build_verifier(cfg, tasks: dict[str, Any]):
    """The verifier backend of `cfg.verifier.kind` (auto: Ray actors when Ray runs generation)."""
    from stepforge.loop.verifiers import VERIFIERS

    v = cfg.verifier
    verify_kwargs = {"seeds": tuple(v.seeds), "check_affine": v.check_affine}
    kind = v.kind if v.kind != "auto" else ("ray" if cfg.uses_ray() else "pool")
    backend = VERIFIERS.get(kind)
    if kind == "ray":
        return backend(v.workers, v.timeout_s, verify_kwargs, num_cpus=v.num_cpus)
    if kind == "inline":
        from stepforge.benchmark.open_mode import verify_open
        from stepforge.benchmark.verifier import verify

        def verify_inline(key: str, text: str, mode: str = "closed"):
            return (verify_open if mode == "open" else verify)(tasks[key], text, **verify_kwargs)

        return backend(verify_inline)
    from stepforge.benchmark.pool import VerifierPool

    return backend(VerifierPool(v.workers, v.timeout_s, tasks=tasks, verify_kwargs=verify_kwargs))


# ---------------------------------------------------------------------------
# helpers of the job


def ensure_tiny_model(path: str | Path) -> Path:
    """Build the tiny random test model at `path` unless a model is already there."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        from stepforge.serve.tiny_model import build_tiny_model

        build_tiny_model(path)
    return path


def default_run_dir(name: str) -> Path:
    """`runs/<name>-<timestamp>`."""
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_events(cfg, n_tasks: int, progress: Optional[bool]) -> Events:
    """Progress display: a rich bar on a terminal, log lines otherwise, nothing when turned off."""
    from stepforge.loop.progress import LogProgress, RichProgress

    show = cfg.progress if progress is None else progress
    if not show:
        return Events()
    return RichProgress(n_tasks) if sys.stderr.isatty() else LogProgress(n_tasks)


def load_seed(cfg, benchmark_keys: Sequence[str], where: str = "config",
              store: Optional[RunStore] = None) -> list[BufferEntry]:
    """The seeded entries of `cfg.seed_buffer` (none for a non-adaptive variant).

    A run directory keeps the seed it started with (seed_buffer.jsonl): a
    resumed run reads that copy, never the source again.
    """
    from stepforge.loop.buffer import SeedBufferError, read_seed_buffer
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
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _shutdown_ray_if_started(was_running: bool) -> None:
    if not was_running and _ray_running():
        import ray

        ray.shutdown()  # a local instance this run started


def _config_of_resumed(store: RunStore, overrides: list[str]):
    """The resumed run's own config (overrides applied and written back)."""
    from stepforge.config_io import apply_overrides, read_mapping
    from stepforge.loop import config as C
    from stepforge.loop.runstore import CONFIG, atomic_write_text

    C.check_resume_overrides(overrides)
    where = str(store.path(CONFIG))
    data, keys = apply_overrides(read_mapping(store.path(CONFIG), allow_empty=False), overrides)
    cfg = C.config_from_dict(data, where, keys)
    if overrides:
        atomic_write_text(store.path(CONFIG), cfg.to_yaml())
    return cfg, where


def check_budget(cfg, proposer: Proposer, tasks: dict[str, Any], settings, where: str = "config"):
    """Round 0's estimate; BudgetError (with the numbers) when the budget cannot cover round 0."""
    from stepforge.loop.budget import check_covers_round0, estimate

    est = estimate(proposer, tasks, settings, cfg.proposer.max_tokens if cfg.proposer.resolved_kind == "llm" else None)
    check_covers_round0(est, cfg.budget, where)
    return est


def print_estimate(est, budget) -> None:
    """The estimate and the budget on stderr (before the first request)."""
    for line in est.lines():
        print(line, file=sys.stderr)
    if any(v is not None for v in (budget.tokens, budget.samples, budget.wall_s)):
        print(f"budget: tokens {budget.tokens or '-'}, samples {budget.samples or '-'}, wall_s {budget.wall_s or '-'}",
              file=sys.stderr)


# ---------------------------------------------------------------------------
# the job


def run_improve(config_path: Optional[str | Path] = None, *, run_dir: Optional[str | Path] = None,
                resume: Optional[str | Path] = None, overrides: Sequence[str] = (),
                progress: Optional[bool] = None) -> ImproveOutcome:
    """`stepforge improve`: a new run (config + overrides) or `resume` of a run directory."""
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop import config as C
    from stepforge.loop.reporting.report import write_report

    overrides = list(overrides)
    if resume is not None and config_path is not None:
        raise ConfigError("--resume continues a run with its own config.yaml; leave out --config")
    store: Optional[RunStore] = None
    try:
        with contextlib.ExitStack() as run_files:
            if resume is not None:
                store = run_files.enter_context(RunStore.open(resume))
                cfg, where = _config_of_resumed(store, overrides)
            else:
                cfg = C.resolve_model_paths(C.load_config(config_path, overrides))
                where = str(config_path) if config_path is not None else "config"
            tasks_all = load_benchmark()
            keys = C.select_tasks(C.strip_modes(cfg.tasks), tasks_all, where)
            modes = C.task_modes(cfg.tasks, tasks_all, cfg.mode, where)
            if cfg.proposer.tiny_model and cfg.proposer.backend is not None:
                ensure_tiny_model(cfg.proposer.backend.model)
            C.check_model_paths(cfg, where)
            if store is not None and store.load_state().get("status") == "done":
                return ImproveOutcome(store.root, write_report(store.root, store), None)
            new_dir = Path(run_dir or default_run_dir(cfg.name))
            if store is None:
                RunStore.check_new(new_dir)  # before any model starts
            tasks = {k: tasks_all[k] for k in keys}
            seed = load_seed(cfg, list(tasks_all), where, store)
            seed_tasks = {e.task_key: tasks_all[e.task_key] for e in seed}
            with contextlib.ExitStack() as stack:  # models, verifier and Ray: closed before the report
                stack.callback(_shutdown_ray_if_started, _ray_running())
                components = build_components(cfg, tasks, stack, where)
                settings = settings_from_config(cfg)
                est = check_budget(cfg, components.proposer, tasks, settings, where)  # before the run dir is made
                if store is None:
                    store = run_files.enter_context(RunStore.create(new_dir, cfg.to_yaml()))
                _save_seed(store, seed)
                cached, _ = store.prepare_resume()
                print_estimate(est, cfg.budget)  # the run files are sound: the first request follows
                events = stack.enter_context(contextlib.closing(make_events(cfg, len(keys), progress)))
                executor = Executor(components.proposer, components.guardian, components.verifier,
                                    chunk_size=cfg.chunk_size, guard_temperature=cfg.guardian.temperature,
                                    stop_when_solved=cfg.stop_when_solved,
                                    sink=store.append_samples, prompt_sink=store.add_prompts, events=events)
                stack.callback(executor.close)
                loop = SelfImprovementLoop(tasks, executor, settings, store=store,
                                           cached=cached, prompts=store.load_prompts(), events=events, seed=seed,
                                           seed_tasks=seed_tasks, modes=modes,
                                           budget=BudgetMeter.from_config(cfg.budget))
                result = loop.run()
            summary = write_report(store.root, store)
            return ImproveOutcome(store.root, summary, result, loop.new_samples, loop.replayed_samples)
    except KeyboardInterrupt:
        if store is None:
            raise
        raise Interrupted(store.root) from None

__all__ = [
    "Components",
    "ImproveError",
    "ImproveOutcome",
    "Interrupted",
    "PROPOSERS",
    "build_components",
    "build_verifier",
    "check_budget",
    "print_estimate",
    "check_proposer_options",
    "default_run_dir",
    "ensure_tiny_model",
    "load_seed",
    "make_events",
    "run_improve",
    "start_ray",
]
