"""Repair turns through `stepforge improve` subprocesses: SIGKILL mid-repair then `--resume`, budget stops.

The proposer is `test_repair:repair_factory` (wrong first answers, follow-ups
fixed for about half the seeds once a verdict is shown); verification is the
benchmark's VerifierPool on real tasks. Each resumed or budget-continued run
must end with exactly the samples of an uninterrupted run (turns included),
each recorded once, and must not ask again for anything already on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stepforge.loop.runstore import load_jsonl

pytestmark = pytest.mark.slow  # end to end: process kills

TESTS = Path(__file__).resolve().parent
STEPFORGE = str(Path(sys.executable).parent / "stepforge")
TASKS = ["bmm/bmm_0", "gemm/G_0_6_02", "rope/G_0_3_02", "moe-index/G_0_3_03"]
N, TEMPS = 1, [0.4, 1.0]
BUDGET = 10  # round 0 has 8 first turns; the budget stops the run inside round 0's repair turns
ROUND0 = len(TASKS) * len(TEMPS) * N


def _config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "repair-resume", "tasks": TASKS, "variant": "agent+si",
        "proposer": {"kind": "custom", "factory": "test_repair:repair_factory", "options": {"every": 2}},
        "guardian": {"kind": "rule"}, "temperatures": TEMPS, "n": N, "max_rounds": 3, "seed": 5,
        "repair_turns": 2, "chunk_size": 1,
        "verifier": {"kind": "pool", "workers": 1, "timeout_s": 60, "seeds": [0]}, "progress": False}))
    return path


def _env(delay: float, log: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parents[1].parent), env.get("PYTHONPATH", "")])
    env["STEPFORGE_TEST_DELAY_S"] = str(delay)
    env.pop("RAY_ADDRESS", None)
    if log is not None:
        env["STEPFORGE_REQUEST_LOG"] = str(log)
    return env


def _improve(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([STEPFORGE, "improve", *args], env=env, capture_output=True, text=True, timeout=300)


def _buffer(run: Path) -> list:
    return [(e["task_key"], e["impl"], e["success_count"], e["n_samples"], e["round"])
            for e in load_jsonl(run / "buffer.jsonl")]


def _view(run: Path) -> dict:
    out = {}
    for rec in load_jsonl(run / "samples.jsonl"):
        key = (rec["round"], rec["step"], rec["task"], rec["temperature"], rec["index"], rec["turn"])
        assert key not in out, f"sample {key} recorded twice"
        out[key] = (rec["guarded"], rec["verdict"]["stage"], rec["correct"], rec["seed"], rec["parent"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repair_ref")
    config = _config(tmp / "repair.yaml")
    done = _improve("--config", str(config), "--run-dir", str(tmp / "ref"), env=_env(0.0))
    assert done.returncode == 0, done.stderr
    view = _view(tmp / "ref")
    assert any(k[5] > 0 for k in view) and any(v[2] for k, v in view.items() if k[5] > 0), "no repair solved a task"
    return config, tmp / "ref", view


def test_sigkill_mid_repair_then_resume_loses_and_reasks_nothing(reference, tmp_path):
    config, ref, ref_view = reference
    run, log = tmp_path / "run", tmp_path / "requests.jsonl"
    proc = subprocess.Popen([STEPFORGE, "improve", "--config", str(config), "--run-dir", str(run)],
                            env=_env(0.4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples, deadline = run / "samples.jsonl", time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:  # kill once repair turns are being recorded
        recs = load_jsonl(samples) if samples.exists() else []
        if sum(1 for r in recs if r.get("turn")) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    on_disk = load_jsonl(samples)
    assert len(on_disk) < len(ref_view) and any(r["turn"] for r in on_disk)
    with open(samples, "ab") as fh:  # a torn last line, as a kill inside write() leaves
        fh.write(b'{"round": 0, "step"')

    done = _improve("--resume", str(run), env=_env(0.0, log))
    assert done.returncode == 0, done.stderr
    assert _view(run) == ref_view and _buffer(run) == _buffer(ref)
    # nothing already answered is asked again: a follow-up (n = 1) on disk is never re-requested, and a first
    # request is re-run only for indices that were missing
    by_seed: dict[int, int] = {}
    for r in on_disk:
        by_seed[r["seed"]] = by_seed.get(r["seed"], 0) + 1
    asked = load_jsonl(log)
    assert asked, "the resumed run asked for nothing"
    for req in asked:
        assert by_seed.get(req["seed"], 0) < req["n"], f"re-asked an answered request: {req}"
    assert json.loads((run / "state.json").read_text())["status"] == "done"


def test_budget_stop_then_resume_with_a_larger_budget(reference, tmp_path):
    config, ref, ref_view = reference
    run = tmp_path / "run"
    stopped = _improve("--config", str(config), "--run-dir", str(run), "--set", f"budget.samples={BUDGET}",
                       env=_env(0.0))
    assert stopped.returncode == 0, stopped.stderr
    assert f"round 0 sends {len(TASKS) * len(TEMPS)} requests for {ROUND0} samples" in stopped.stderr
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "budget" and state["stop_reason"] == f"budget.samples: {BUDGET} samples of {BUDGET}"
    recorded = load_jsonl(run / "samples.jsonl")
    assert len(recorded) == BUDGET and sum(1 for r in recorded if r["turn"]) == BUDGET - ROUND0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "budget" and summary["run"]["samples"] == BUDGET

    more = _improve("--resume", str(run), "--set", "budget.samples=1000", env=_env(0.0))
    assert more.returncode == 0, more.stderr
    assert _view(run) == ref_view and _buffer(run) == _buffer(ref)
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    assert "## Repair turns" in (run / "report.md").read_text()


def test_a_budget_below_round_0_is_refused_with_the_numbers(tmp_path):
    config = _config(tmp_path / "repair.yaml")
    run = tmp_path / "run"
    refused = _improve("--config", str(config), "--run-dir", str(run), "--set", "budget.samples=5", env=_env(0.0))
    assert refused.returncode == 2 and ROUND0 > 5
    assert f"budget.samples=5 is less than round 0's {ROUND0} samples" in refused.stderr
    assert "Traceback" not in refused.stderr and not (run / "samples.jsonl").exists()
