"""`stepforge improve` killed with SIGKILL mid-round, then `--resume`, equals an uninterrupted run.

The proposer is the scripted `benchmark_factory` of test_loop_scripted.py
(reference impls for some samples, chosen by the sample's seed; one task only
solvable with demonstrations, so the run has several rounds); verification
is real (the benchmark's VerifierPool on real tasks). Both modes: in open mode
the replies are candidates (the task's own fns with the impl or a wrong
program) verified with their own fns.
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

pytestmark = pytest.mark.slow  # end to end: real Ray, training or process kills

TESTS = Path(__file__).resolve().parent
STEPFORGE = str(Path(sys.executable).parent / "stepforge")
TASKS = ["bmm/bmm_0", "gemm/G_0_6_02", "rope/G_0_3_02", "moe-index/G_0_3_03"]


def _config(path: Path, mode: str = "closed") -> Path:
    cfg = {
        "name": "resume-test",
        "tasks": TASKS,
        "mode": mode,
        "variant": "agent+si",
        "proposer": {"kind": "custom", "factory": "test_loop_scripted:benchmark_factory",
                     "options": {"every": 3, "needs_demos": ["moe-index/G_0_3_03"]}},
        "guardian": {"kind": "rule"},
        "temperatures": [0.4, 1.0],
        "n": 3,
        "max_rounds": 4,
        "seed": 11,
        "chunk_size": 1,
        "verifier": {"kind": "pool", "workers": 1, "timeout_s": 60, "seeds": [0]},
        "progress": False,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(delay: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["STEPFORGE_TEST_DELAY_S"] = str(delay)
    env.pop("RAY_ADDRESS", None)
    return env


def _untimed(value):
    """The value without timing fields (names holding `second` or `time`)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "second" not in k and "time" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _sample_view(run: Path) -> dict:
    out = {}
    for rec in load_jsonl(run / "samples.jsonl"):
        key = (rec["round"], rec["step"], rec["task"], rec["temperature"], rec["index"])
        assert key not in out, f"sample {key} recorded twice"
        out[key] = (rec["guarded"], rec["verdict"]["stage"], rec["correct"], rec["seed"], rec["demonstrations"])
    return out


@pytest.fixture(scope="module", params=["closed", "open"])
def reference(tmp_path_factory, request):
    """The uninterrupted run (same config and seeds), in each mode."""
    tmp = tmp_path_factory.mktemp("resume_ref")
    config = _config(tmp / "resume.yaml", request.param)
    ref = tmp / "ref"
    done = subprocess.run([STEPFORGE, "improve", "--config", str(config), "--run-dir", str(ref)], env=_env(0.0),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return config, ref


# killed inside round 1 (round 0 has 4 tasks x 2 temperatures x 3 samples = 24): the resumed run must replay
# round 0 from disk, rebuild the buffer, and finish a half-done step
@pytest.mark.parametrize("kill_after", [27])
def test_sigkill_then_resume_matches_uninterrupted(reference, tmp_path, kill_after):
    config, ref = reference
    run = tmp_path / "run"
    ref_samples = _sample_view(ref)
    total = len(ref_samples)
    ref_steps = [json.loads(x) for x in (ref / "steps.jsonl").read_text().splitlines()]
    assert len({s["round"] for s in ref_steps}) >= 2, "the scenario should take more than one round"
    assert total > kill_after

    proc = subprocess.Popen([STEPFORGE, "improve", "--config", str(config), "--run-dir", str(run)], env=_env(0.4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples = run / "samples.jsonl"
    deadline = time.monotonic() + 180
    lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        lines = samples.read_bytes().count(b"\n") if samples.exists() else 0
        if lines >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    killed_at = len(load_jsonl(samples))
    assert kill_after <= killed_at < total, (killed_at, total)
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "running"
    with open(samples, "ab") as fh:  # and a torn write, as a kill inside write() would leave
        fh.write(b'{"round": 0, "step": 0, "task": "bmm/bmm_0", "temperature"')

    resumed = subprocess.run([STEPFORGE, "improve", "--resume", str(run)], env=_env(0.0), capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr

    assert _sample_view(run) == ref_samples  # every sample once, none lost, none redone differently
    assert (run / "buffer.jsonl").read_text() == (ref / "buffer.jsonl").read_text()
    ref_summary = json.loads((ref / "summary.json").read_text())
    run_summary = json.loads((run / "summary.json").read_text())
    assert _untimed(run_summary) == _untimed(ref_summary)
    assert run_summary["run"]["samples"] == total and run_summary["status"] == "done"
    assert [(s["round"], s["step"], s["solved"]) for s in map(json.loads, (run / "steps.jsonl").read_text().splitlines())] \
        == [(s["round"], s["step"], s["solved"]) for s in ref_steps]
    assert "moe-index/G_0_3_03" in run_summary["buffer"]
    mode = yaml.safe_load(config.read_text())["mode"]
    assert run_summary["mode"] == mode and {r["mode"] for r in load_jsonl(samples)} == {mode}
    for name in ("report.md", "tasks_solved.png", "tokens.png", "config.yaml", "state.json"):
        assert (run / name).is_file()

    again = subprocess.run([STEPFORGE, "improve", "--resume", str(run)], env=_env(0.0), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stderr
    assert len(load_jsonl(samples)) == total
