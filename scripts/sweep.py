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

`ray.python` is the interpreter of the entrypoint; by default the one running
this script (`sys.executable`: the project's venv, where typer, torch and the
rest are installed), which is right for a head on this machine and for nodes
that share the venv's path (one image, or a shared file system). Set it when
the nodes' environment lives elsewhere (e.g. `/opt/venv/bin/python`); a bare
`python` is whatever the job's PATH finds first, usually not the venv.
`ray.env_vars` are added to the job's runtime environment (HF offline flags
are always set).

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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from stepforge.training.sweep import (  # noqa: F401 - the script's library, re-exported for its users
    ALWAYS_EXCLUDED,
    DEFAULT_ENV,
    GRID_KEYS,
    OVERRIDE_KEYS,
    REPO_ROOT,
    TABLE_COLUMNS,
    TERMINAL,
    Grid,
    Job,
    RaySettings,
    SweepConfig,
    SweepError,
    _config_path,
    _job_cells,
    _round0,
    _slug,
    expand,
    gather,
    load_manifest,
    load_sweep_config,
    save_manifest,
    sweep_dir,
)

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
    base = [cfg.ray.python or sys.executable, "-m", "stepforge.cli"]
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
    if os.environ.get("RAY_ADDRESS") == "local":
        # a driver's "start a private instance" setting names no Jobs API, and Ray's job client would
        # take it to mean "find the cluster running here" (failing when several run)
        del os.environ["RAY_ADDRESS"]
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
