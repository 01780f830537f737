"""`stepforge ablate`: SFT versus in-context self-improvement on one task split.

Arms (each an ordinary `stepforge improve` run in RUN_DIR/arms/<arm>):

==============  ==================  =========================================
arm             model               variant
==============  ==================  =========================================
base            the base model      `variants.plain` (default `agent`: round 0)
base+si         the base model      `variants.si` (default `agent+si`)
sft             base + the adapter  `variants.plain`
sft+si          base + the adapter  `variants.si`
base+si+repair  the base model      `variants.si` with `repair_turns` (default 2)
sft+si+repair   base + the adapter  `variants.si` with `repair_turns`
==============  ==================  =========================================

The +repair arms (opt in with `arms:`) send each failed sample back to the
proposer with its verdict, up to `repair_turns` times; the other arms run
with no repair turns. All arms share the improve config's `budget`, so
`improve.budget.samples` compares them at one number of samples.

Every arm runs the same improve config (`improve_config` file and/or the
inline `improve` mapping): the same test tasks, n, temperatures, max_rounds,
granularity, seed, guardian and verifier, and the same prompt
(`proposer: {kind: llm, knowledge: <prompt.knowledge>}`); arms differ only in
the variant, `proposer.backend.lora_path` and, for the in-context arms, the
seeded buffer. The config each arm ran is kept in RUN_DIR/configs/<arm>.yaml.

Split (`split`): `source_run` names an improve run whose buffer is the earned
experience: train = the tasks it earned, test = the other tasks of
`split.tasks`. Or `split.train` / `split.test` name them: keys or globs, a split name
(`published`, `new`, `all`), or a selection mapping (benchmark/selection.py), e.g.
`split: {train: published, test: new}` for train-on-published, test-on-new.

Seeded in-context arms (`seed_si: true`, the default, with a source run): the
train split's earned entries are written to RUN_DIR/seed_buffer.jsonl and the
base+si and sft+si arms start D from them (`seed_buffer`), so in-context
self-improvement starts from the same experience SFT is trained on instead of
earning its own demonstrations first (round 0 is still base knowledge only,
and the seeded entries are never counted as solved).

SFT (`sft`): an existing adapter (`sft.adapter`), or one trained into
RUN_DIR/sft with `stepforge train sft`'s pipeline from the source run's buffer
entries of the train tasks (plus, with `sft.train_extra` or when there is no
source run, the train tasks' reference solutions), with the SFT settings of
`sft.config` + `sft.set`. The prompt of SFT examples that are built (not
recorded) is the ablation's evaluation prompt (`prompt.knowledge`), so the
model is trained on the prompt it is tested with.

Resuming: running again with the same RUN_DIR skips finished arms, resumes an
interrupted one (`stepforge improve --resume`) and reuses a trained adapter.
A RUN_DIR holding a different ablation config is refused.

Output in RUN_DIR: ablation.md, ablation.csv, ablation.json (one row per arm:
tasks solved, task completion, round-0 pass@1 and pass@n, samples, tokens,
wall seconds) and ablation.png (bars). pass@1 / pass@n are the unbiased
estimates over each task's round-0 samples (n per temperature, every
temperature: the budget all arms share), averaged over the test tasks;
`pass@n` uses k = n.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator

from stepforge.benchmark.selection import TaskSpec, as_spec
from stepforge.config_io import StrictModel
from stepforge.errors import StepforgeError
from stepforge.training.ablate_report import render_markdown, write_csv, write_plot
from stepforge.training.ablate_sft import _cluster_gpus, _train_sft_task, sft_task_options

from .settings import apply_overrides, read_yaml_mapping, validate_model

ARMS: tuple[str, ...] = ("base", "base+si", "sft", "sft+si", "base+si+repair", "sft+si+repair")
DEFAULT_ARMS: tuple[str, ...] = ARMS[:4]
ARM_DIRS = {"base": "base", "base+si": "base_si", "sft": "sft", "sft+si": "sft_si",
            "base+si+repair": "base_si_repair", "sft+si+repair": "sft_si_repair"}
ArmName = Literal["base", "base+si", "sft", "sft+si", "base+si+repair", "sft+si+repair"]
CONFIG_FILE = "ablation.yaml"
SEED_FILE = "seed_buffer.jsonl"

class AblationError(StepforgeError):
    """An expected failure of the ablation (one line per problem in the CLI)."""


class SplitSettings(StrictModel):
    source_run: Optional[str] = None
    tasks: TaskSpec = Field(default_factory=lambda: ["*"])
    train: Optional[TaskSpec] = None  # a split name (published, new), keys/globs, or a selection mapping
    test: Optional[TaskSpec] = None

    @field_validator("tasks", "train", "test", mode="before")
    @classmethod
    def _listify(cls, v):
        return as_spec(v)

    @model_validator(mode="after")
    def _one_kind(self) -> "SplitSettings":
        if self.source_run is None and not self.test:
            raise ValueError("give source_run (an improve run: train = the tasks it solved, test = the rest of "
                             "tasks) or test (and optionally train) as task keys, globs, a split name or a selection")
        if self.source_run is not None and (self.train is not None or self.test is not None):
            raise ValueError("give either source_run or train/test, not both")
        return self


class SFTArmSettings(StrictModel):
    adapter: Optional[str] = None
    config: Optional[str] = None
    set: list[str] = Field(default_factory=list)
    train_extra: bool = False


class PromptChoice(StrictModel):
    knowledge: Literal["full", "none"] = "full"


class Variants(StrictModel):
    plain: Literal["single", "agent"] = "agent"
    si: Literal["agent+si", "ir-ablation"] = "agent+si"


class AblationConfig(StrictModel):
    name: str = "ablate"
    model: str = Field(min_length=1)
    tiny_model: bool = False
    improve_config: Optional[str] = None
    improve: dict[str, Any] = Field(default_factory=dict)
    prompt: PromptChoice = Field(default_factory=PromptChoice)
    split: SplitSettings
    sft: SFTArmSettings = Field(default_factory=SFTArmSettings)
    arms: list[ArmName] = Field(default_factory=lambda: list(DEFAULT_ARMS), min_length=1)
    variants: Variants = Field(default_factory=Variants)
    repair_turns: int = Field(default=2, ge=1, le=16)  # of the +repair arms
    seed_si: bool = True  # +si arms start D from the source run's train entries (needs split.source_run)

    @field_validator("arms")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"expected distinct arms, got {v}")
        return [a for a in ARMS if a in v]

    def needs_sft(self) -> bool:
        return any(a.startswith("sft") for a in self.arms)


@dataclass
class AblationOutcome:
    run_dir: Path
    rows: list[dict[str, Any]]
    markdown: str
    split: dict[str, list[str]]
    adapter: Optional[Path]


# ---------------------------------------------------------------------------
# config


def _resolve(path: str | None) -> str | None:
    """A path from the config, relative to the current directory (as every CLI path)."""
    if path is None:
        return None
    return str(Path(path).expanduser().resolve())


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read and validate an ablation config (TrainingConfigError naming the file and key)."""
    data = read_yaml_mapping(path, "ablation settings")
    data, keys = apply_overrides(data, list(overrides or []))
    cfg = validate_model(AblationConfig, data, str(path), keys)
    cfg = cfg.model_copy(update={"model": _resolve(cfg.model), "improve_config": _resolve(cfg.improve_config)})
    cfg.split = cfg.split.model_copy(update={"source_run": _resolve(cfg.split.source_run)})
    cfg.sft = cfg.sft.model_copy(update={"adapter": _resolve(cfg.sft.adapter), "config": _resolve(cfg.sft.config)})
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_improve_dict(cfg: AblationConfig) -> dict[str, Any]:
    """The improve config all arms share (file, then the inline mapping on top)."""
    data: dict[str, Any] = {}
    if cfg.improve_config:
        from stepforge.config_io import read_mapping
        from stepforge.errors import ConfigError

        try:
            data = read_mapping(cfg.improve_config, "settings (tasks, proposer, ...)")
        except ConfigError as exc:
            raise AblationError(str(exc)) from None
    return _deep_merge(data, cfg.improve)


def arm_improve_dict(cfg: AblationConfig, base: dict[str, Any], arm: str, test: list[str],
                     adapter: Optional[Path], seed_buffer: Optional[Path] = None) -> dict[str, Any]:
    """The improve config of one arm: the shared config, the test tasks, the arm's variant and model;
    the +si arms start D from `seed_buffer` when given."""
    data = copy.deepcopy(base)
    data["name"] = f"{cfg.name}-{arm}"
    data["tasks"] = list(test)
    data["variant"] = cfg.variants.si if _in_context(arm) else cfg.variants.plain
    data["repair_turns"] = cfg.repair_turns if arm.endswith("+repair") else 0
    proposer = dict(data.get("proposer") or {})
    backend = dict(proposer.get("backend") or {"kind": "hf"})
    backend["model"] = cfg.model
    backend["lora_path"] = str(adapter) if arm.startswith("sft") else None
    proposer["backend"] = backend
    proposer.pop("tiny_model", None)
    proposer.pop("factory", None)
    proposer["kind"] = "llm"
    proposer["knowledge"] = cfg.prompt.knowledge
    data["proposer"] = proposer
    if seed_buffer is not None and _in_context(arm):
        data["seed_buffer"] = str(seed_buffer)
    return data


def _in_context(arm: str) -> bool:
    """The arms that run in-context self-improvement (+si, with or without repair)."""
    return "+si" in arm


def seed_entries(cfg: AblationConfig, split: dict[str, list[str]]) -> list[Any]:
    """The source run's earned entries of the train tasks (the +si arms' seed), in buffer order."""
    from .data import DatasetError, load_buffer

    if not (cfg.seed_si and cfg.split.source_run is not None):
        return []
    train = set(split["train"])
    origin = str(Path(cfg.split.source_run) / "buffer.jsonl")
    try:
        return [e.model_copy(update={"source": origin}) for e in load_buffer(cfg.split.source_run, seeded=False)
                if e.task_key in train]
    except DatasetError as exc:
        raise AblationError(str(exc)) from None


def validate_arm(data: dict[str, Any], where: str):
    from stepforge.loop.config import ConfigError, config_from_dict

    try:
        return config_from_dict(data, where)
    except ConfigError as exc:
        raise AblationError(str(exc)) from None


# ---------------------------------------------------------------------------
# split


def compute_split(cfg: AblationConfig) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} as benchmark keys, in benchmark order."""
    from .data import DatasetError, load_buffer, select_task_keys

    s = cfg.split
    try:
        if s.source_run is not None:
            pool = select_task_keys(s.tasks, "split.tasks")
            solved = {e.task_key for e in load_buffer(s.source_run, seeded=False)}
            train = [k for k in pool if k in solved]
            test = [k for k in pool if k not in solved]
        else:
            test = select_task_keys(s.test or [], "split.test")
            train = select_task_keys(s.train, "split.train") if s.train else []
    except DatasetError as exc:
        raise AblationError(str(exc)) from None
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise AblationError(f"split: train and test share {', '.join(overlap)}; the test tasks must be unseen")
    if not test:
        raise AblationError("split: no test task left (every task of split.tasks is solved in the source run's buffer)")
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------
# SFT


def ensure_adapter(cfg: AblationConfig, run_dir: Path, split: dict[str, list[str]], base_improve: dict[str, Any],
                   log) -> Optional[Path]:
    """The adapter of the SFT arms: given, reused from RUN_DIR/sft, or trained now."""
    from .pipeline import run_sft
    from .settings import PromptSettings, SFTSettings, load_sft_settings
    from .sft import ADAPTER_CONFIG, SFT_RECORD

    if not cfg.needs_sft():
        return None
    if cfg.sft.adapter:
        path = Path(cfg.sft.adapter)
        if not (path / ADAPTER_CONFIG).is_file():
            raise AblationError(f"sft.adapter: {path} is not a peft adapter folder (no {ADAPTER_CONFIG})")
        return path
    out = run_dir / "sft"
    if (out / SFT_RECORD).is_file() and (out / ADAPTER_CONFIG).is_file():
        log(f"sft: reusing the adapter in {out}")
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted training: start it again
    settings: SFTSettings = load_sft_settings(cfg.sft.config, cfg.sft.set)
    style = (base_improve.get("proposer") or {}).get("style", "ir")
    settings = settings.model_copy(update={"prompt": PromptSettings(style=style, knowledge=cfg.prompt.knowledge)})
    if not split["train"]:
        raise AblationError("sft: no training task (split.train is empty and there is no source run)")
    extra = split["train"] if (cfg.sft.train_extra or cfg.split.source_run is None) else []
    kwargs = {"run_dir": cfg.split.source_run, "model": cfg.model, "out": out, "settings": settings,
              "extra_tasks": extra, "only_tasks": split["train"]}
    options = sft_task_options(_cluster_gpus())
    where = f"a Ray task reserving {options['num_gpus']:g} GPU" if options else "this process"
    log(f"sft: training on {len(split['train'])} tasks in {where} -> {out}")
    if options is None:
        return run_sft(**kwargs).out
    import ray

    task = ray.remote(_train_sft_task).options(**options)
    return Path(ray.get(task.remote(kwargs)))


# ---------------------------------------------------------------------------
# arms


def run_arm(arm_dir: Path, config_path: Path, progress: Optional[bool]) -> dict[str, Any]:
    """Run (or resume, or just read) one arm; its summary."""
    from stepforge.loop.job import run_improve
    from stepforge.loop.reporting.report import write_report

    state_path = arm_dir / "state.json"
    if state_path.is_file() and json.loads(state_path.read_text(encoding="utf-8")).get("status") == "done":
        summary_path = arm_dir / "summary.json"
        if summary_path.is_file():
            return json.loads(summary_path.read_text(encoding="utf-8"))
        return write_report(arm_dir)
    if (arm_dir / "config.yaml").is_file():
        return run_improve(None, resume=arm_dir, progress=progress).summary
    if arm_dir.exists() and any(arm_dir.iterdir()):
        shutil.rmtree(arm_dir)  # a run that never wrote its config: nothing to keep
    return run_improve(config_path, run_dir=arm_dir, progress=progress).summary


def arm_row(arm: str, variant: str, summary: dict[str, Any], n: int, adapter: Optional[Path]) -> dict[str, Any]:
    """One table row from an arm's summary (round-0 pass@k over its test tasks)."""
    from stepforge.loop.reporting.metrics import pass_at_k

    run = summary["run"]
    p1, pn = [], []
    for tm in summary["tasks"].values():
        first = next((s for s in tm.get("per_step", []) if s["round"] == 0), None)
        samples, correct = (first["n"], first["c"]) if first else (0, 0)
        p1.append(pass_at_k(samples, correct, 1) if samples else 0.0)
        pn.append(pass_at_k(samples, correct, n) if samples else 0.0)
    count = len(summary["tasks"]) or 1
    return {
        "arm": arm,
        "model": "base+adapter" if adapter is not None else "base",
        "variant": variant,
        "tasks": run["tasks"],
        "solved": run["tasks_solved"],
        "completion": round(run["task_completion"], 4),
        "pass@1": round(sum(p1) / count, 4),
        "pass@n": round(sum(pn) / count, 4),
        "samples": run["samples"],
        "prompt_tokens": run["prompt_tokens"],
        "completion_tokens": run["completion_tokens"],
        "wall_seconds": round(run["wall_seconds"], 2),
        "solved_by_repair": len((summary.get("repair") or {}).get("tasks_solved_by_repair") or []),
        "status": summary.get("status", "unknown"),
    }


# ---------------------------------------------------------------------------
# the job


def _check_run_dir(run_dir: Path, resolved: str) -> None:
    existing = run_dir / CONFIG_FILE
    if existing.is_file():
        if existing.read_text(encoding="utf-8") != resolved:
            raise AblationError(f"{run_dir}: holds a different ablation ({CONFIG_FILE} differs); use another "
                                f"--run-dir, or the same config to resume it")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise AblationError(f"{run_dir}: exists, is not empty and is not an ablation directory")


def run_ablation(config_path: str | Path, *, run_dir: str | Path | None = None, overrides: list[str] | None = None,
                 progress: Optional[bool] = None, log=None) -> AblationOutcome:
    """Split, SFT (if needed), the arms (each a resumable improve run), then the table and plot."""
    import sys

    log = log or (lambda msg: print(f"[ablate] {msg}", file=sys.stderr, flush=True))
    cfg = load_ablation_config(config_path, overrides)
    if cfg.tiny_model and not (Path(cfg.model) / "config.json").is_file():
        from stepforge.serve.tiny_model import build_tiny_model

        build_tiny_model(cfg.model)
    if not (Path(cfg.model) / "config.json").is_file():
        raise AblationError(f"{config_path}: model: {cfg.model} is not a model directory (no config.json)")
    base = base_improve_dict(cfg)
    split = compute_split(cfg)
    out = Path(run_dir) if run_dir is not None else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resolved = yaml.safe_dump({"ablation": cfg.model_dump(mode="json"), "split": split}, sort_keys=False)
    _check_run_dir(out, resolved)
    # check every arm's config before any work
    placeholder = Path(cfg.sft.adapter or out / "sft")
    seed = seed_entries(cfg, split)
    seed_path = (out / SEED_FILE).resolve() if seed else None
    arm_cfgs = {arm: validate_arm(arm_improve_dict(cfg, base, arm, split["test"], placeholder, seed_path),
                                  f"{config_path} (arm {arm})") for arm in cfg.arms}
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(resolved, encoding="utf-8")
    (out / "split.json").write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    if seed_path is not None:  # an arm run keeps its own copy of the seed, so rewriting this is harmless
        seed_path.write_text("".join(e.model_dump_json() + "\n" for e in seed), encoding="utf-8")
    ray_started = _start_ray(arm_cfgs.values())
    rows = []
    try:
        adapter = ensure_adapter(cfg, out, split, base, log)  # on a GPU of the cluster when it has one
        (out / "configs").mkdir(exist_ok=True)
        for arm in cfg.arms:
            arm_adapter = adapter if arm.startswith("sft") else None
            data = arm_improve_dict(cfg, base, arm, split["test"], arm_adapter, seed_path)
            arm_cfg = validate_arm(data, f"{config_path} (arm {arm})")
            config_path_arm = out / "configs" / f"{ARM_DIRS[arm]}.yaml"
            config_path_arm.write_text(arm_cfg.to_yaml(), encoding="utf-8")
            seeded = f", D seeded with {len(seed)} train entries" if arm_cfg.seed_buffer else ""
            log(f"arm {arm}: {arm_cfg.variant}, {'adapter ' + str(arm_adapter) if arm_adapter else 'base model'}"
                f"{seeded}")
            try:
                summary = run_arm(out / "arms" / ARM_DIRS[arm], config_path_arm, progress)
            except Exception as exc:
                if isinstance(exc, StepforgeError):
                    raise AblationError(f"arm {arm}: {exc}") from None
                raise
            rows.append(arm_row(arm, arm_cfg.variant, summary, arm_cfg.n, arm_adapter))
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    first = next(iter(arm_cfgs.values()))
    markdown = render_markdown(cfg.name, rows, split, first.n, list(first.temperatures), adapter)
    (out / "ablation.md").write_text(markdown, encoding="utf-8")
    write_csv(out / "ablation.csv", rows)
    (out / "ablation.json").write_text(json.dumps({"name": cfg.name, "split": split, "adapter": str(adapter) if adapter
                                                   else None, "n": first.n, "temperatures": list(first.temperatures),
                                                   "rows": rows}, indent=2) + "\n", encoding="utf-8")
    write_plot(out / "ablation.png", cfg.name, rows)
    return AblationOutcome(out, rows, markdown, split, adapter)


def _start_ray(arm_cfgs) -> bool:
    """Start (or join) Ray once, for the SFT training and all arms, when the arms generate with a model;
    True if started here."""
    import ray

    if ray.is_initialized():
        return False
    arm_cfgs = list(arm_cfgs)
    needs = any(c.proposer.resolved_kind in ("llm", "custom") or c.uses_ray() for c in arm_cfgs)
    if not needs:
        return False
    from stepforge.serve.actors import init_ray

    first = arm_cfgs[0]
    init_ray(first.ray.address, first.ray.num_cpus)
    return True


__all__ = [
    "ARMS",
    "AblationConfig",
    "AblationError",
    "AblationOutcome",
    "arm_improve_dict",
    "arm_row",
    "compute_split",
    "load_ablation_config",
    "run_ablation",
    "seed_entries",
    "sft_task_options",
]
