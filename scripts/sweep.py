#!/usr/bin/env python
"""Sweeps on a Ray cluster: a grid of `stepforge improve` (or `stepforge ablate`) runs as Ray jobs.

    python scripts/sweep.py run --config configs/sweep_search.yaml --address http://HEAD:8265
    python scripts/sweep.py submit --config ...      # submit only (idempotent: done or running jobs are skipped)
    python scripts/sweep.py wait --config ...        # follow the jobs' status until they end
    python scripts/sweep.py gather --config ...      # one table (markdown + CSV) from the run directories
    python scripts/sweep.py plan --config ...        # print the jobs and their `ray job submit` commands

The grid (models x variants x m x seeds x temperatures, from the YAML's `grid`
or `--models/--variants/--m/--seeds/--temperatures`) expands into one job per
point. Each job is an ordinary run with `--set` overrides of the base config:

=============  ================================  =================================
grid key       improve job                       ablate job
=============  ================================  =================================
models         proposer.backend.model            model
variants       variant                           variants.si
m              granularity                       improve.granularity
seeds          seed                              improve.seed
temperatures   temperatures                      improve.temperatures
=============  ================================  =================================

Each job writes its run directory RUNS_ROOT/<job> (`runs_root` must be a path
every node sees, e.g. NFS; it is resolved on this machine). A job whose run
directory already exists is resubmitted as `stepforge improve --resume DIR`
(an ablation resumes by itself), so re-running the sweep finishes what a
failed or stopped job left.

How a job finds the project (`ray.code`):

- `upload` (default): this checkout is copied (without .git, .venv, runs,
  caches and `ray.excludes`) into a staging folder as `stepforge/`, next to
  a copy of `configs/`, and that folder is the job's `--working-dir`. Ray
  puts the working dir first on the job's and its workers' `sys.path`, so
  `python -m stepforge.cli` runs exactly this code. The dependencies (torch,
  transformers, trl, ray, ...) must be installed in the nodes' Python.
- `installed`: the nodes' Python has stepforge installed (same image or
  venv); the working dir holds only the configs.

`ray.python` is the interpreter of the entrypoint (default `python`, the one
on the nodes' PATH, usually the Python that started Ray); `ray.env_vars` are
added to the job's runtime environment (HF offline flags are always set).

Jobs are submitted with the `ray job submit --no-wait` CLI (so the commands
printed by `plan` are exactly what runs); their status and logs are followed
with the Python SDK (`ray.job_submission.JobSubmissionClient`) of the same
Jobs API. The address is `--address`, `ray.address`, $RAY_API_SERVER_ADDRESS
or $RAY_ADDRESS: the dashboard URL of the head node (http://HEAD:8265). A
cluster with token authentication (Ray's default where a token exists) is
reached with the token of ~/.ray/auth_token, $RAY_AUTH_TOKEN or
$RAY_AUTH_TOKEN_PATH (token mode is switched on when RAY_AUTH_MODE is unset).

State: RUNS_ROOT/<name>/sweep.json (the jobs, their submission ids and last
status), sweep.md and sweep.csv (the table). Expected errors print one line
and exit with status 2; `wait` / `run` exit 1 when a job failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from stepforge.config_io import StrictModel
from stepforge.errors import StepforgeError

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    python: str = "python"
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


def _set(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SweepError(f"--set {dotted}: {part} is not a mapping")
    node[parts[-1]] = value


def load_sweep_config(path: Optional[str | Path], overrides: list[str], cli_grid: dict[str, Any]) -> SweepConfig:
    data: dict[str, Any] = {}
    where = str(path) if path else "sweep"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise SweepError(f"{path}: sweep config not found") from None
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SweepError(f"{path}: (top level): expected a mapping (name, command, config, grid, ...)")
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set {text}: expected key.path=value")
        _set(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    for key, value in cli_grid.items():
        if value is not None:
            data.setdefault("grid", {})[key] = value
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{where}: {loc}: {err['msg']}")
        raise SweepError("\n".join(lines)) from None
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
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# jobs on Ray


def resolve_address(cfg: SweepConfig, cli_address: Optional[str]) -> str:
    address = cli_address or cfg.ray.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SweepError("no Ray cluster: give --address http://HEAD:8265 (the dashboard), ray.address, or set RAY_ADDRESS")
    return address


def use_cluster_token() -> None:
    """Ray >= 2.5x clusters started where a token exists (~/.ray/auth_token, $RAY_AUTH_TOKEN or
    $RAY_AUTH_TOKEN_PATH) require it on every Jobs API call; clients send it only in token mode.
    With RAY_AUTH_MODE unset and a token available, token mode is turned on for this process and
    the `ray job` commands it runs (an explicit RAY_AUTH_MODE is left alone)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else
                                                          (Path.home() / ".ray" / "auth_token").is_file())
    if has_token:
        os.environ["RAY_AUTH_MODE"] = "token"


def ray_cli() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


def _ignore(extra: list[str]):
    import fnmatch

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            if name in ALWAYS_EXCLUDED or name.endswith((".egg-info", ".pyc")) or any(
                    fnmatch.fnmatch(name, pat) for pat in extra):
                out.add(name)
        return out

    return ignore


def config_in_working_dir(cfg: SweepConfig) -> str:
    """The base config's path inside the job's working dir (configs/ keeps its repository path)."""
    config = _config_path(cfg.config)
    try:
        return str(config.relative_to(REPO_ROOT))
    except ValueError:
        return f"sweep_config/{config.name}"


def stage_working_dir(cfg: SweepConfig, into: Path) -> str:
    """Fill the job's working dir (configs/, the base config, and the code for `upload`); the config's path in it."""
    shutil.copytree(REPO_ROOT / "configs", into / "configs", ignore=_ignore(cfg.ray.excludes), dirs_exist_ok=True)
    if cfg.ray.code == "upload":
        shutil.copytree(REPO_ROOT, into / "stepforge", ignore=_ignore(cfg.ray.excludes))
    rel = config_in_working_dir(cfg)
    target = into / rel
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_config_path(cfg.config), target)
    return rel


def entrypoint(cfg: SweepConfig, job: Job, config_rel: str) -> list[str]:
    """The job's command: an ordinary `stepforge improve` (new or --resume) or `stepforge ablate`."""
    base = [cfg.ray.python, "-m", "stepforge.cli"]
    if cfg.command == "improve":
        if (Path(job.run_dir) / "config.yaml").is_file():
            return base + ["improve", "--resume", job.run_dir, "--no-progress"]
        cmd = base + ["improve", "--config", config_rel, "--run-dir", job.run_dir]
    else:
        cmd = base + ["ablate", "--config", config_rel, "--run-dir", job.run_dir]
    for text in job.overrides:
        cmd += ["--set", text]
    return cmd + ["--no-progress"]


def runtime_env(cfg: SweepConfig) -> dict[str, Any]:
    return {"env_vars": {**DEFAULT_ENV, **cfg.ray.env_vars}}


def submit_command(cfg: SweepConfig, address: str, submission_id: str, working_dir: str,
                   entry: list[str]) -> list[str]:
    cmd = [ray_cli(), "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", working_dir, "--runtime-env-json", json.dumps(runtime_env(cfg)),
           "--entrypoint-num-cpus", f"{cfg.ray.entrypoint_num_cpus:g}", "--no-wait"]
    if cfg.ray.entrypoint_num_gpus:
        cmd += ["--entrypoint-num-gpus", f"{cfg.ray.entrypoint_num_gpus:g}"]
    return cmd + ["--"] + entry


def run_finished(cfg: SweepConfig, job: Job) -> bool:
    """The job's run directory holds a finished run (nothing to submit)."""
    run = Path(job.run_dir)
    if cfg.command == "ablate":
        return (run / "ablation.json").is_file()
    state = run / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text(encoding="utf-8")).get("status") == "done"
    except ValueError:
        return False


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection problems of any kind
        raise SweepError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


def job_status(sdk, submission_id: str) -> str:
    try:
        return str(sdk.get_job_status(submission_id).value)
    except Exception as exc:  # noqa: BLE001
        raise SweepError(f"cannot get the status of job {submission_id}: {exc}") from None


def submit(cfg: SweepConfig, address: str, log) -> list[Job]:
    """Submit every job not finished and not pending/running; record the attempts."""
    jobs = load_manifest(cfg)
    sdk = client(address)
    todo = []
    for job in jobs:
        if run_finished(cfg, job):
            log(f"{job.job}: finished run in {job.run_dir}; not submitted")
            continue
        if job.submission_id:
            status = job_status(sdk, job.submission_id)
            job.attempts[-1]["status"] = status
            if status not in TERMINAL:
                log(f"{job.job}: {job.submission_id} is {status}; not submitted again")
                continue
        todo.append(job)
    if todo:
        with tempfile.TemporaryDirectory(prefix=f"stepforge-sweep-{cfg.name}-") as tmp:
            config_rel = stage_working_dir(cfg, Path(tmp))
            for job in todo:
                sid = f"{job.job}-{uuid.uuid4().hex[:8]}"
                entry = entrypoint(cfg, job, config_rel)
                cmd = submit_command(cfg, address, sid, tmp, entry)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    save_manifest(cfg, jobs)
                    raise SweepError(f"{job.job}: ray job submit failed: {' | '.join(tail)}")
                job.attempts.append({"submission_id": sid, "status": "PENDING", "submitted": time.time(),
                                     "entrypoint": entry, "message": ""})
                log(f"{job.job}: submitted as {sid}")
    save_manifest(cfg, jobs)
    return jobs


def wait(cfg: SweepConfig, address: str, log, timeout_s: Optional[float] = None) -> list[Job]:
    """Follow the submitted jobs until every one has ended (or the timeout); record their status."""
    jobs = load_manifest(cfg)
    sdk = client(address)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    live = [j for j in jobs if j.submission_id]
    while True:
        pending = []
        for job in live:
            status = job_status(sdk, job.submission_id)
            if status != job.status:
                log(f"{job.job}: {status}")
            job.attempts[-1]["status"] = status
            if status not in TERMINAL:
                pending.append(job)
            elif status == "FAILED" and not job.attempts[-1].get("message"):
                try:
                    info = sdk.get_job_info(job.submission_id)
                    logs = sdk.get_job_logs(job.submission_id).strip().splitlines()
                    first = (info.message or "").strip().splitlines()[:1]
                    job.attempts[-1]["message"] = " | ".join(first + logs[-1:])
                except Exception:  # noqa: BLE001 - logs are best effort
                    pass
        save_manifest(cfg, jobs)
        if not pending:
            return jobs
        if deadline is not None and time.monotonic() > deadline:
            raise SweepError(f"timed out after {timeout_s:g} s with {len(pending)} job(s) not finished: "
                             + ", ".join(j.job for j in pending))
        live = pending
        time.sleep(cfg.poll_s)


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
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) if (run / "config.yaml").is_file() else {}
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


# ---------------------------------------------------------------------------
# command line


def _csv_list(text: Optional[str], cast) -> Optional[list]:
    if text is None:
        return None
    return [None if v.strip() in ("", "null", "none") else cast(v.strip()) for v in text.split(",")]


def _temperature_lists(text: Optional[str]) -> Optional[list]:
    if text is None:
        return None
    return [[float(t) for t in group.split(",") if t.strip()] for group in text.split(";") if group.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "submit", "wait", "gather", "plan"))
    parser.add_argument("--config", "-c", help="sweep config (YAML, e.g. configs/sweep_search.yaml)")
    parser.add_argument("--address", help="Ray dashboard URL (default: ray.address, $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a sweep key: key.path=value")
    parser.add_argument("--base-config", help="the improve/ablate config every job runs (instead of `config`)")
    parser.add_argument("--command", choices=("improve", "ablate"))
    parser.add_argument("--runs-root", help="shared folder for the jobs' run directories")
    parser.add_argument("--name", help="sweep name")
    parser.add_argument("--models", help="comma-separated model paths")
    parser.add_argument("--variants", help="comma-separated variants (improve) / si variants (ablate)")
    parser.add_argument("--m", help="comma-separated granularities")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--temperatures", help="temperature lists: '0.4,0.7,1.0;1.0' is two grid values")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the jobs (wait/run)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(f"[sweep] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    overrides = list(args.overrides)
    for key, value in (("config", args.base_config), ("command", args.command), ("runs_root", args.runs_root),
                       ("name", args.name)):
        if value is not None:
            overrides.append(f"{key}={value}")
    grid = {"models": _csv_list(args.models, str), "variants": _csv_list(args.variants, str),
            "m": _csv_list(args.m, int), "seeds": _csv_list(args.seeds, int),
            "temperatures": _temperature_lists(args.temperatures)}
    try:
        if args.config is None and args.base_config is None:
            raise SweepError("give --config SWEEP.yaml (or --base-config with the grid options)")
        cfg = load_sweep_config(args.config, overrides, grid)
        if args.action == "plan":
            address = args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or "http://HEAD:8265"
            for job in load_manifest(cfg):
                cmd = submit_command(cfg, address, f"{job.job}-<id>", "<staging dir>",
                                     entrypoint(cfg, job, config_in_working_dir(cfg)))
                print(f"{job.job}: {job.run_dir}\n  " + " ".join(_quote(c) for c in cmd))
            return 0
        if args.action == "gather":
            _, markdown, folder = gather(cfg)
            print(markdown)
            log(f"wrote {folder / 'sweep.md'} and {folder / 'sweep.csv'}")
            return 0
        address = resolve_address(cfg, args.address)
        use_cluster_token()
        if args.action in ("submit", "run"):
            submit(cfg, address, log)
        if args.action == "submit":
            return 0
        jobs = wait(cfg, address, log, args.timeout or cfg.timeout_s)
        _, markdown, folder = gather(cfg, jobs)
        print(markdown)
        log(f"wrote {folder / 'sweep.md'} and {folder / 'sweep.csv'}")
        failed = [j for j in jobs if j.status in ("FAILED", "STOPPED")]
        for j in failed:
            log(f"{j.job}: {j.status}: {j.attempts[-1].get('message') or 'see: ray job logs ' + j.submission_id}")
        return 1 if failed else 0
    except SweepError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


if __name__ == "__main__":
    sys.exit(main())
