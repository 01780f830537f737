"""Sweeps as data: the sweep config, its grid of jobs, the manifest, and the gathered table.

`scripts/sweep.py` submits the jobs to a Ray cluster (`ray job submit`) and
calls `gather` for the table; this module needs no Ray.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from stepforge.config_io import StrictModel, apply_overrides, read_mapping, validate
from stepforge.errors import ConfigError, StepforgeError

REPO_ROOT = Path(__file__).resolve().parent.parent  # the repository (the package root in a checkout)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ALWAYS_EXCLUDED = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist",
                   ".whl", "node_modules", ".mypy_cache", ".ruff_cache"}
GRID_KEYS = ("models", "variants", "m", "seeds", "temperatures")
OVERRIDE_KEYS = {
    "improve": {"models": "proposer.backend.model", "variants": "variant", "m": "granularity", "seeds": "seed",
                "temperatures": "temperatures"},
    "ablate": {"models": "model", "variants": "variants.si", "m": "improve.granularity", "seeds": "improve.seed",
               "temperatures": "improve.temperatures"},
}
TABLE_COLUMNS = ("job", "arm", "model", "variant", "m", "seed", "temperatures", "job_status", "run_status", "tasks",
                 "solved", "completion", "pass@1", "pass@n", "samples", "prompt_tokens", "completion_tokens",
                 "wall_seconds", "run_dir")


class SweepError(StepforgeError):
    """An expected failure: a bad sweep config, no Ray address, a failed submission."""


class Grid(StrictModel):
    """Values per axis; `null` (the default) leaves the base config's value."""

    models: list[Optional[str]] = Field(default_factory=lambda: [None], min_length=1)
    variants: list[Optional[str]] = Field(default_factory=lambda: [None], min_length=1)
    m: list[Optional[int]] = Field(default_factory=lambda: [None], min_length=1)
    seeds: list[Optional[int]] = Field(default_factory=lambda: [None], min_length=1)
    temperatures: list[Optional[list[float]]] = Field(default_factory=lambda: [None], min_length=1)

    @field_validator("models", "variants", "m", "seeds", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if not isinstance(v, list) else v

    @field_validator("temperatures", mode="before")
    @classmethod
    def _temps(cls, v):
        if v is None:
            return [None]
        if isinstance(v, list) and v and all(isinstance(t, (int, float)) for t in v):
            return [v]  # one temperature list
        return v


class RaySettings(StrictModel):
    address: Optional[str] = None
    code: Literal["upload", "installed"] = "upload"
    python: Optional[str] = None  # the entrypoint's interpreter; None: the one running the sweep (its venv)
    env_vars: dict[str, str] = Field(default_factory=dict)
    excludes: list[str] = Field(default_factory=list)
    entrypoint_num_cpus: float = Field(default=1.0, ge=0)
    entrypoint_num_gpus: float = Field(default=0.0, ge=0)


class SweepConfig(StrictModel):
    name: str = Field(default="sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    command: Literal["improve", "ablate"] = "improve"
    config: str
    runs_root: str = "runs/sweeps"
    grid: Grid = Field(default_factory=Grid)
    set: list[str] = Field(default_factory=list)
    ray: RaySettings = Field(default_factory=RaySettings)
    poll_s: float = Field(default=5.0, gt=0)
    timeout_s: Optional[float] = Field(default=None, gt=0)


@dataclass
class Job:
    job: str
    params: dict[str, Any]
    overrides: list[str]
    run_dir: str
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {submission_id, status, submitted, message}

    @property
    def submission_id(self) -> Optional[str]:
        return self.attempts[-1]["submission_id"] if self.attempts else None

    @property
    def status(self) -> Optional[str]:
        return self.attempts[-1].get("status") if self.attempts else None

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "params": self.params, "overrides": self.overrides, "run_dir": self.run_dir,
                "attempts": self.attempts}


# ---------------------------------------------------------------------------
# config and grid


def load_sweep_config(path: Optional[str | Path], overrides: list[str], cli_grid: dict[str, Any]) -> SweepConfig:
    """The sweep config of `path` (None: defaults) with `--set` overrides and grid values from the command line."""
    where = str(path) if path else "sweep"
    try:
        data = read_mapping(path, "sweep settings (name, command, config, grid, ...)", noun="sweep config") if path is not None else {}
        data, keys = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    for key, value in cli_grid.items():
        if value is not None:
            data.setdefault("grid", {})[key] = value
    cfg = validate(SweepConfig, data, where, keys, error=SweepError)
    config_path = _config_path(cfg.config)
    if not config_path.is_file():
        raise SweepError(f"{where}: config: {cfg.config} not found (a path relative to the repository or absolute)")
    return cfg


def _config_path(text: str) -> Path:
    p = Path(text).expanduser()
    if p.is_absolute() or p.is_file():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def _slug(value: Any) -> str:
    if value is None:
        return "base"
    if isinstance(value, list):
        return "-".join(f"{v:g}" for v in value)
    text = Path(str(value)).name if "/" in str(value) else str(value)
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "x"


def expand(cfg: SweepConfig) -> list[Job]:
    """One job per grid point (in grid order), with its `--set` overrides and run directory."""
    root = Path(cfg.runs_root).expanduser().resolve()
    keys = OVERRIDE_KEYS[cfg.command]
    axes = [getattr(cfg.grid, k) for k in GRID_KEYS]
    jobs = []
    for i, point in enumerate(itertools.product(*axes)):
        params = dict(zip(GRID_KEYS, point))
        overrides = list(cfg.set)
        parts = []
        for key, value in params.items():
            if value is None:
                continue
            overrides.append(f"{keys[key]}={json.dumps(value) if isinstance(value, list) else value}")
            parts.append({"models": "", "variants": "", "m": "m", "seeds": "s", "temperatures": "t"}[key] + _slug(value))
        name = f"{cfg.name}-{i:03d}" + ("-" + "_".join(parts) if parts else "")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:120]
        jobs.append(Job(job=name, params=params, overrides=overrides, run_dir=str(root / name)))
    if len({j.job for j in jobs}) != len(jobs):
        raise SweepError("the grid gives two jobs the same name")
    return jobs


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.runs_root).expanduser().resolve() / f"_{cfg.name}"


def load_manifest(cfg: SweepConfig) -> list[Job]:
    """The grid's jobs, with the attempts recorded by earlier submissions."""
    jobs = expand(cfg)
    path = sweep_dir(cfg) / "sweep.json"
    if path.is_file():
        known = {j["job"]: j for j in json.loads(path.read_text(encoding="utf-8")).get("jobs", [])}
        for job in jobs:
            if job.job in known:
                job.attempts = list(known[job.job].get("attempts", []))
    return jobs


def save_manifest(cfg: SweepConfig, jobs: list[Job]) -> Path:
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"name": cfg.name, "command": cfg.command, "config": cfg.config,
                               "runs_root": str(Path(cfg.runs_root).expanduser().resolve()),
                               "jobs": [j.to_json() for j in jobs]}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------
# the table


def _round0(summary: dict[str, Any], n: Optional[int]) -> tuple[Optional[float], Optional[float]]:
    from stepforge.loop.reporting.metrics import pass_at_k

    tasks = summary.get("tasks") or {}
    if not tasks:
        return None, None
    p1, pn = [], []
    for tm in tasks.values():
        first = next((s for s in tm.get("per_step", []) if s["round"] == 0), None)
        samples, correct = (first["n"], first["c"]) if first else (0, 0)
        p1.append(pass_at_k(samples, correct, 1) if samples else 0.0)
        pn.append(pass_at_k(samples, correct, n or samples) if samples else 0.0)
    return round(sum(p1) / len(p1), 4), round(sum(pn) / len(pn), 4)


def _job_cells(job: Job) -> dict[str, Any]:
    p = job.params
    return {"job": job.job, "model": p.get("models") or "(config)", "variant": p.get("variants") or "(config)",
            "m": p.get("m") if p.get("m") is not None else "(config)",
            "seed": p.get("seeds") if p.get("seeds") is not None else "(config)",
            "temperatures": json.dumps(p["temperatures"]) if p.get("temperatures") else "(config)",
            "job_status": job.status or "not submitted", "run_dir": job.run_dir}


def gather(cfg: SweepConfig, jobs: Optional[list[Job]] = None) -> tuple[list[dict[str, Any]], str, Path]:
    """One row per improve job (per arm for ablate jobs), written as sweep.md and sweep.csv."""
    jobs = jobs if jobs is not None else load_manifest(cfg)
    rows = []
    for job in jobs:
        cells = _job_cells(job)
        run = Path(job.run_dir)
        empty = {k: "" for k in TABLE_COLUMNS}
        if cfg.command == "ablate":
            path = run / "ablation.json"
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                for r in data["rows"]:
                    rows.append({**empty, **cells, "arm": r["arm"], "variant": r["variant"],
                                 "run_status": r["status"], **{k: r[k] for k in (
                                     "tasks", "solved", "completion", "pass@1", "pass@n", "samples",
                                     "prompt_tokens", "completion_tokens", "wall_seconds")}})
                continue
            rows.append({**empty, **cells, "run_status": "no result"})
            continue
        path = run / "summary.json"
        if not path.is_file():
            rows.append({**empty, **cells, "run_status": "no result"})
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        config = read_mapping(run / "config.yaml") if (run / "config.yaml").is_file() else {}
        r = summary["run"]
        p1, pn = _round0(summary, config.get("n"))
        rows.append({**empty, **cells, "variant": summary.get("variant") or cells["variant"],
                     "m": config.get("granularity", cells["m"]), "seed": config.get("seed", cells["seed"]),
                     "temperatures": json.dumps(config.get("temperatures")) if config.get("temperatures") else cells["temperatures"],
                     "run_status": summary.get("status", ""), "tasks": r["tasks"], "solved": r["tasks_solved"],
                     "completion": round(r["task_completion"], 4), "pass@1": p1, "pass@n": pn,
                     "samples": r["samples"], "prompt_tokens": r["prompt_tokens"],
                     "completion_tokens": r["completion_tokens"], "wall_seconds": round(r["wall_seconds"], 2)})
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in TABLE_COLUMNS})
    (folder / "sweep.csv").write_text(buf.getvalue(), encoding="utf-8")
    cols = [c for c in TABLE_COLUMNS if c != "arm" or cfg.command == "ablate"]
    lines = [f"# Sweep {cfg.name} ({cfg.command}, {len(jobs)} jobs)", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and c != "wall_seconds" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    (folder / "sweep.md").write_text(markdown, encoding="utf-8")
    return rows, markdown, folder
