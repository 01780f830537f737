"""Experiment configuration of `stepforge improve`, loaded from YAML.

One file (configs/<name>.yaml) names one experiment: which tasks, which
proposer and guardian, which variant of the published comparison, the
sampling budget of Algorithm 1 and the verifier and Ray settings. Every key
has a default, so `{}` is a valid config (the whole benchmark, search
proposer, rule guardian, adaptive self-improvement).

Errors never show a pydantic traceback: `load_config` raises `ConfigError`
whose text is one line per problem, `FILE: key.path: what was expected`
(a key set by `--set` is marked as such).

Variants (docs/design.md "Agents"):

=============  =====================================================
single         proposer only (no guardian), base knowledge, round 0
agent          proposer + guardian, round 0
agent+si       proposer + guardian + adaptive self-improvement
ir-ablation    agent+si with the proposer prompted with generated
               Python instead of the structural IR (proposer.style)
=============  =====================================================

`single` overrides `guardian.kind` to `none`; `ir-ablation` overrides
`proposer.style` to `python` (see `effective()`).

Seeding D (`seed_buffer: PATH`, a run directory or its buffer.jsonl): the
entries of another run's buffer start the buffer D, e.g. the train split's
earned experience for the in-context arms of `stepforge ablate`. Seeded
entries are demonstrations only: round 0 still uses base knowledge only;
from round 1 on they are stratified with the entries earned in this run.
They are not re-verified and never leave X: an entry whose task this run
attempts is left out of the seed (its answer would be shown for its own
task). They are written to this run's buffer.jsonl with `source` = where they
came from (entries earned here have `source: null`) and are never counted as
solved in the state or the summary. The entries are copied into the run
directory (seed_buffer.jsonl) when the run starts, so `--resume` replays the
same demonstrations even if the source run changed. Only the adaptive
variants use the seed (`single` and `agent` stop after round 0).

Modes (docs/language.md, section 5a): `mode: closed` (default) gives every task
its fns and asks for the impl; `mode: open` shows the tasks without fns and
asks for a candidate with fns and impl. A task pattern may set its own mode,
`open:PATTERN` or `closed:PATTERN` (`tasks: ["closed:gemm/*", "open:norm/*"]`),
so one run may mix them; a task takes one mode per run, and a task declared
`open: false` cannot be run open.

Rounds. Round 0 attempts every task with base knowledge only; each later
round is one pass of Algorithm 1's `repeat` body. `max_rounds` counts all
rounds including round 0 (so `max_rounds: 2` is round 0 plus one
self-improvement round); `single` and `agent` always stop after round 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from stepforge.benchmark.selection import TaskSpec, as_spec
from stepforge.config_io import StrictModel, apply_overrides, format_problems, parse_override, read_mapping
from stepforge.errors import ConfigError, short_repr
from stepforge.serve.base import check_temperature
from stepforge.serve.config import BackendConfig

Variant = Literal["single", "agent", "agent+si", "ir-ablation"]
VARIANTS: tuple[str, ...] = ("single", "agent", "agent+si", "ir-ablation")
ADAPTIVE_VARIANTS = ("agent+si", "ir-ablation")

# keys a resumed run may change: they do not change what is sampled or verified
RESUME_SETTABLE = (
    "ray.",
    "verifier.workers",
    "verifier.kind",
    "proposer.replicas",
    "proposer.backend.model",
    "proposer.backend.tokenizer",
    "proposer.backend.device",
    "proposer.backend.batch_size",
    "proposer.backend.base_url",
    "proposer.backend.api_key",
    "proposer.backend.gpu_memory_utilization",
    "guardian.backend.model",
    "guardian.backend.tokenizer",
    "guardian.backend.device",
    "guardian.backend.batch_size",
    "guardian.backend.base_url",
    "guardian.backend.api_key",
    "progress",
    "budget.",  # a run stopped by its budget continues under a larger one
)




class ProposerConfig(StrictModel):
    """Who writes candidate programs.

    `kind: null` means `llm` when a backend is configured, else `search`
    (the model-free search proposer). `custom` builds a proposer with
    `factory: "package.module:function"`, called as `function(config, tasks)`
    (an extension point; the tests use it for a scripted proposer).
    `options` are keyword arguments of the search proposer (or the LLM
    proposer). `tiny_model: true` builds the tiny random test model
    (`stepforge tiny-model`) at `backend.model` if that folder is missing.

    `knowledge` is what the LLM proposer's system message carries besides
    the role and the answer format: `full` = the base knowledge (STeP
    reference with worked examples, the published setting), `none` = nothing
    (the compact prompt, for fine-tuned models and SFT on CPU; see
    `loop/agents/knowledge/__init__.py`). SFT data built for the same settings uses exactly
    this prompt (`stepforge.training.data.PromptBuilder`).
    """

    kind: Optional[Literal["llm", "search", "custom"]] = None
    style: Literal["ir", "python"] = "ir"
    knowledge: Literal["full", "none"] = "full"  # the LLM proposer's system message (see the class docstring)
    backend: Optional[BackendConfig] = None
    replicas: int = Field(default=1, ge=1)
    max_tokens: int = Field(default=1024, ge=1)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    factory: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)
    tiny_model: bool = False  # build the tiny test model at backend.model when that folder does not exist

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @model_validator(mode="after")
    def _kind(self) -> "ProposerConfig":
        if self.kind == "llm" and self.backend is None:
            raise ValueError("kind 'llm' needs a backend (proposer.backend: {kind: hf|vllm|openai, model: ...})")
        if self.kind == "custom" and not self.factory:
            raise ValueError("kind 'custom' needs factory: 'package.module:function'")
        if self.factory and ":" not in self.factory:
            raise ValueError(f"factory: expected 'package.module:function', got {short_repr(self.factory)}")
        return self

    @property
    def resolved_kind(self) -> str:
        """`llm`, `search` or `custom` (a null kind resolved from the backend)."""
        if self.kind is not None:
            return self.kind
        return "llm" if self.backend is not None else "search"


class GuardianConfig(StrictModel):
    """Who repairs the affine rule: `rule` (program transformation), `llm` or `none`.

    An LLM guardian uses `backend`, or the proposer's backend when null.
    """

    kind: Literal["rule", "llm", "none"] = "rule"
    backend: Optional[BackendConfig] = None
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return check_temperature(v)


class VerifierConfig(StrictModel):
    """How candidates are scored.

    `kind`: `pool` = the benchmark's process pool on this machine; `ray` =
    Ray actors each holding a warm verifier (spread over a cluster);
    `inline` = in this process, no time limit (debugging); `auto` = `ray`
    when generation runs on Ray, else `pool`. `check_affine: false` scores
    function alone (the affine rule is still reported per sample).
    `num_cpus` is what each Ray verifier actor reserves.
    """

    kind: Literal["auto", "pool", "ray", "inline"] = "auto"
    workers: int = Field(default=2, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    check_affine: bool = True
    num_cpus: float = Field(default=1.0, gt=0)  # per Ray verifier actor


class BudgetConfig(StrictModel):
    """Limits of a run (null: none); see `loop/budget.py`. A run that reaches one stops with status `budget`
    and continues with `--resume RUN --set budget.KEY=LARGER`."""

    tokens: Optional[int] = Field(default=None, ge=1)  # proposer prompt (once per request) + completion + guardian
    samples: Optional[int] = Field(default=None, ge=1)  # sample records, repair turns included (exact)
    wall_s: Optional[float] = Field(default=None, gt=0)  # seconds of this process's loop


class RayConfig(StrictModel):
    """Ray cluster: `address` (else $RAY_ADDRESS) joins a cluster by its GCS address (HEAD:6379), `auto`
    (the `ray start` cluster of this machine) or ray://HEAD:10001; null or `local` starts a private
    instance of `num_cpus` CPUs (`num_cpus` is ignored when joining). The dashboard URL
    (http://HEAD:8265) is for `ray job submit` / scripts/sweep.py, not here."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, ge=1)


class ImproveConfig(StrictModel):
    """The whole experiment (see the module docstring)."""

    name: str = "improve"
    tasks: TaskSpec = Field(default_factory=lambda: ["*"])  # keys/globs/splits, or {split, groups, difficulty, mode}
    mode: Literal["closed", "open"] = "closed"  # a task pattern's `open:`/`closed:` prefix or a selection's mode wins
    variant: Variant = "agent+si"
    proposer: ProposerConfig = Field(default_factory=ProposerConfig)
    guardian: GuardianConfig = Field(default_factory=GuardianConfig)
    granularity: int = Field(default=3, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [0.4, 0.7, 1.0], min_length=1)
    n: int = Field(default=4, ge=1)
    max_rounds: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)
    max_demonstrations: Optional[int] = Field(default=None, ge=0)
    seed_buffer: Optional[str] = None  # a run dir or buffer.jsonl whose entries start D (see the module docstring)
    chunk_size: int = Field(default=8, ge=1)
    repair_turns: int = Field(default=0, ge=0, le=16)  # follow-ups per failed sample with the verdict shown
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    # a streaming proposer (search) stops sampling a task in a step once a sample is correct (loop/early_stop.py)
    stop_when_solved: bool = True
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    progress: bool = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v):
        v = as_spec(v)
        if isinstance(v, list) and not v:
            raise ValueError("expected at least one task key, glob or split")
        return v

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        for t in v:
            check_temperature(t)  # one meaning on every backend, before any engine starts
        if len(set(v)) != len(v):
            raise ValueError(f"expected distinct temperatures, got {v}")
        return v

    # -- derived -----------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """True for the variants that run Algorithm 1 after round 0."""
        return self.variant in ADAPTIVE_VARIANTS

    @property
    def rounds_limit(self) -> int:
        """Rounds this variant may run, round 0 included."""
        return self.max_rounds if self.adaptive else 1

    def effective(self) -> "ImproveConfig":
        """The config with the variant's overrides applied (what actually runs)."""
        cfg = self.model_copy(deep=True)
        if cfg.variant == "single":
            cfg.guardian = cfg.guardian.model_copy(update={"kind": "none"})
        if cfg.variant == "ir-ablation":
            cfg.proposer = cfg.proposer.model_copy(update={"style": "python"})
        return cfg

    def guardian_backend(self) -> Optional[BackendConfig]:
        """The LLM guardian's backend: its own, else the proposer's."""
        return self.guardian.backend or self.proposer.backend

    def uses_ray(self) -> bool:
        """Generation runs through Ray actors (an LLM proposer or guardian), or a cluster is named."""
        cfg = self.effective()
        llm = cfg.proposer.resolved_kind == "llm" or cfg.guardian.kind == "llm"
        return llm or cfg.verifier.kind == "ray" or bool(cfg.ray.address)

    def to_yaml(self) -> str:
        """The config as YAML (what the run directory keeps)."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------------------
# task selection


MODE_PREFIXES = ("closed:", "open:")


def _split_mode(pattern: str) -> tuple[Optional[str], str]:
    """(mode or None, pattern) of a task pattern with an optional `open:` / `closed:` prefix."""
    for prefix in MODE_PREFIXES:
        if pattern.startswith(prefix):
            return prefix[:-1], pattern[len(prefix):].strip()
    return None, pattern


def strip_modes(spec: Any) -> Any:
    """The task spec without the `open:` / `closed:` prefixes of its patterns (what `select_tasks` reads)."""
    if isinstance(spec, str):
        return _split_mode(spec.strip())[1]
    if isinstance(spec, list):
        return [strip_modes(p) if isinstance(p, str) else p for p in spec]
    return spec


def task_modes(spec: Any, tasks: Mapping[str, Any], default: str = "closed", where: str = "config") -> dict[str, str]:
    """Each selected task key's mode: its pattern's `open:`/`closed:` prefix, or the selection
    mapping's `mode`, else `default` (the config's `mode`).

    A task named by patterns of both modes, or posed open while its file says
    `open: false`, is a ConfigError.
    """
    keys = select_tasks(strip_modes(spec), tasks, where)  # every pattern valid and matching
    modes: dict[str, str] = {}
    if isinstance(spec, (str, list)):
        for i, pattern in enumerate([spec] if isinstance(spec, str) else spec):
            mode, bare = _split_mode(pattern.strip()) if isinstance(pattern, str) else (None, pattern)
            for key in select_tasks([bare], tasks, where):
                mode_here = mode or default
                if modes.get(key, mode_here) != mode_here:
                    raise ConfigError(f"{where}: tasks[{i}]: task {key} is selected in both modes; "
                                      f"a task takes one mode per run")
                modes[key] = mode_here
    else:
        chosen = spec.get("mode") if isinstance(spec, Mapping) else getattr(spec, "mode", None)
        modes = {k: chosen or default for k in keys}
    closed_only = [k for k, m in modes.items() if m == "open" and not getattr(tasks[k], "open", True)]
    if closed_only:
        raise ConfigError(f"{where}: tasks: {', '.join(closed_only)} cannot be posed in open mode (open: false); "
                          f"select them with closed:PATTERN")
    return {k: modes[k] for k in keys}


def select_tasks(spec: Any, tasks: Sequence[str] | Mapping[str, Any], where: str = "config") -> list[str]:
    """Task keys that `spec` selects (keys, test names, globs, splits, or a mapping of groups, difficulty,
    mode; see benchmark/selection.py), in benchmark order. `tasks`: the keys, or key -> Task (needed by
    difficulty and mode filters). A pattern that matches nothing is an error naming it."""
    from stepforge.benchmark.selection import select

    return select(spec, tasks, f"{where}: tasks")


# ---------------------------------------------------------------------------
# loading and overrides


def config_from_dict(data: Any, where: str = "config", set_keys: set[str] | None = None) -> ImproveConfig:
    """Validate a mapping into an ImproveConfig; ConfigError naming `where` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: (top level): expected a mapping of settings (tasks, proposer, ...), "
                          f"got {type(data).__name__}")
    try:
        return ImproveConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_problems(exc, where, ImproveConfig, set_keys)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ImproveConfig:
    """Read `path` (None: all defaults), apply `--set` overrides, validate."""
    data = read_mapping(path, "settings (tasks, proposer, ...)") if path is not None else {}
    where = str(path) if path is not None else "config"
    data, keys = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, where, keys)


def check_resume_overrides(overrides: list[str]) -> None:
    """A resumed run may change only operational keys (RESUME_SETTABLE)."""
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SETTABLE):
            allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_SETTABLE)
            raise ConfigError(f"--set {text}: a resumed run keeps its config; only these keys may change: {allowed}")


def resolve_model_paths(cfg: ImproveConfig) -> ImproveConfig:
    """Local paths made absolute (models of hf/vllm backends, `seed_buffer`), so Ray workers and
    resumed runs find them."""
    cfg = cfg.model_copy(deep=True)
    if cfg.seed_buffer and not Path(cfg.seed_buffer).expanduser().is_absolute():
        cfg.seed_buffer = str(Path(cfg.seed_buffer).expanduser().resolve())
    for section in (cfg.proposer, cfg.guardian):
        backend = section.backend
        if backend is None or backend.kind not in ("hf", "vllm"):
            continue
        updates = {}
        for key in ("model", "tokenizer", "lora_path"):
            value = getattr(backend, key)
            if value and not Path(value).expanduser().is_absolute():
                updates[key] = str(Path(value).expanduser().resolve())
        if updates:
            section.backend = backend.model_copy(update=updates)
    return cfg


def check_model_paths(cfg: ImproveConfig, where: str = "config") -> None:
    """Local backends need an existing model directory: fail before starting Ray or a model."""
    checks = []
    # every kind that may use a backend: llm, and custom factories (given the config); search never does
    if cfg.proposer.backend is not None and cfg.proposer.resolved_kind in ("llm", "custom"):
        checks.append(("proposer.backend", cfg.proposer.backend))
    if cfg.effective().guardian.kind == "llm":
        backend = cfg.guardian_backend()
        if backend is None:
            raise ConfigError(f"{where}: guardian.backend: the LLM guardian needs a backend (its own or the proposer's)")
        if cfg.guardian.backend is not None:
            checks.append(("guardian.backend", backend))
    for key, backend in checks:
        if backend.kind in ("hf", "vllm"):
            path = Path(backend.model).expanduser()
            if not path.is_dir():
                raise ConfigError(f"{where}: {key}.model: expected a local model directory, {backend.model!r} does "
                                  f"not exist (set it with --set {key}.model=/path/to/model)")


__all__ = [
    "ADAPTIVE_VARIANTS",
    "BudgetConfig",
    "ConfigError",
    "GuardianConfig",
    "ImproveConfig",
    "ProposerConfig",
    "RESUME_SETTABLE",
    "RayConfig",
    "VARIANTS",
    "VerifierConfig",
    "apply_overrides",
    "check_model_paths",
    "check_resume_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "resolve_model_paths",
    "select_tasks",
]
