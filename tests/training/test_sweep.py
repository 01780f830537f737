"""scripts/sweep.py: grid expansion, job commands, and a real two-job sweep on a local Ray cluster.

The cluster test starts its own Ray head (`ray start --head --block`, every port picked free on
the loopback, its own temp dir) in a new process group, submits the grid with `ray job submit`
through the script, waits for both jobs, checks the gathered table, and stops exactly that
process group. It is skipped, with the reason, only if the head's dashboard (the Jobs API)
does not come up in this environment.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # end to end: real Ray, training or process kills

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _load_sweep():
    spec = importlib.util.spec_from_file_location("stepforge_sweep_script", REPO / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _write(tmp_path: Path, **data) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_expands_into_ordinary_runs(tmp_path):
    path = _write(tmp_path, name="g", config="configs/default.yaml", runs_root=str(tmp_path / "runs"),
                  grid={"models": ["/m/a", "/m/b"], "variants": ["agent", "agent+si"], "m": [3], "seeds": [0, 1],
                        "temperatures": [[0.4, 1.0]]},
                  set=["tasks=[bmm/*]"])
    cfg = sweep.load_sweep_config(path, [], {})
    jobs = sweep.expand(cfg)
    assert len(jobs) == 8 and len({j.job for j in jobs}) == 8
    first = jobs[0]
    assert first.job == "g-000-a_agent_m3_s0_t0.4-1"
    assert first.overrides == ["tasks=[bmm/*]", "proposer.backend.model=/m/a", "variant=agent", "granularity=3",
                               "seed=0", "temperatures=[0.4, 1.0]"]
    assert first.run_dir == str((tmp_path / "runs" / first.job).resolve())
    assert {j.params["variants"] for j in jobs} == {"agent", "agent+si"}
    # every job is an ordinary `stepforge improve`: overrides are valid for the loop's config
    from stepforge.loop.config import load_config

    for job in jobs:
        c = load_config(REPO / "configs" / "default.yaml", job.overrides)
        assert c.variant == job.params["variants"] and c.granularity == 3 and c.temperatures == [0.4, 1.0]
    cmd = sweep.entrypoint(cfg, first, "configs/default.yaml")
    # the default interpreter is the one running the sweep (the venv that has typer, torch, ...), not a bare python
    assert cmd[:6] == [sys.executable, "-m", "stepforge.cli", "improve", "--config", "configs/default.yaml"]
    assert cmd[-1] == "--no-progress" and ["--run-dir", first.run_dir] == cmd[6:8]
    (Path(first.run_dir)).mkdir(parents=True)
    (Path(first.run_dir) / "config.yaml").write_text("{}")
    assert sweep.entrypoint(cfg, first, "configs/default.yaml")[3:6] == ["improve", "--resume", first.run_dir]
    submit = sweep.submit_command(cfg, "http://h:8265", "sid", "/stage", cmd)
    assert submit[1:4] == ["job", "submit", "--address"] and "--no-wait" in submit
    assert submit[submit.index("--") + 1:] == cmd
    env = json.loads(submit[submit.index("--runtime-env-json") + 1])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"

    ablate = sweep.load_sweep_config(path, ["command=ablate", "config=configs/ablate_tiny.yaml", "set=[]"],
                                     {"variants": ["agent+si", "ir-ablation"], "models": None})
    ajobs = sweep.expand(ablate)
    assert len(ajobs) == 8
    ir = next(j for j in ajobs if j.params["variants"] == "ir-ablation" and j.params["seeds"] == 1)
    assert ir.overrides == ["model=/m/b" if ir.params["models"] == "/m/b" else "model=/m/a", "variants.si=ir-ablation",
                            "improve.granularity=3", "improve.seed=1", "improve.temperatures=[0.4, 1.0]"]
    from stepforge.training.ablate import load_ablation_config

    loaded = load_ablation_config(REPO / "configs" / "ablate_tiny.yaml", ir.overrides)
    assert loaded.variants.si == "ir-ablation" and loaded.improve["seed"] == 1
    assert sweep.entrypoint(ablate, ir, "configs/ablate_tiny.yaml")[3:8] == [
        "ablate", "--config", "configs/ablate_tiny.yaml", "--run-dir", ir.run_dir]
    with pytest.raises(sweep.SweepError, match="config: nope.yaml not found"):
        sweep.load_sweep_config(path, ["config=nope.yaml"], {})
    with pytest.raises(sweep.SweepError, match="grid.m"):
        sweep.load_sweep_config(path, [], {"m": ["x"]})


def test_grid_from_the_command_line(tmp_path, capsys):
    code = sweep.main(["plan", "--base-config", "configs/default.yaml", "--runs-root", str(tmp_path), "--name", "cli",
                       "--variants", "agent,agent+si", "--temperatures", "0.4,1.0;0.7", "--seeds", "3",
                       "--address", "http://head:8265"])
    out = capsys.readouterr().out
    assert code == 0
    jobs = [line for line in out.splitlines() if line.startswith("cli-")]
    assert len(jobs) == 4
    assert "--set variant=agent+si --set seed=3 --set 'temperatures=[0.7]'" in out
    assert out.count("job submit --address http://head:8265") == 4
    assert sweep.main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "sweep config not found" in capsys.readouterr().err


def test_gather_ablation_jobs_gives_one_row_per_arm(tmp_path):
    path = _write(tmp_path, name="ab", command="ablate", config="configs/ablate_tiny.yaml",
                  runs_root=str(tmp_path / "runs"), grid={"seeds": [0, 1]})
    cfg = sweep.load_sweep_config(path, [], {})
    jobs = sweep.expand(cfg)
    arm = {"tasks": 2, "solved": 1, "completion": 0.5, "pass@1": 0.25, "pass@n": 0.5, "samples": 4,
           "prompt_tokens": 100, "completion_tokens": 40, "wall_seconds": 1.5, "status": "done"}
    Path(jobs[0].run_dir).mkdir(parents=True)
    (Path(jobs[0].run_dir) / "ablation.json").write_text(json.dumps({"rows": [
        {**arm, "arm": "base", "variant": "agent"}, {**arm, "arm": "sft+si", "variant": "agent+si", "solved": 2}]}))
    assert sweep.run_finished(cfg, jobs[0]) and not sweep.run_finished(cfg, jobs[1])
    rows, markdown, folder = sweep.gather(cfg, jobs)
    assert [(r["job"], r["arm"], r["solved"]) for r in rows] == [(jobs[0].job, "base", 1), (jobs[0].job, "sft+si", 2),
                                                                (jobs[1].job, "", "")]
    assert rows[2]["run_status"] == "no result" and "| arm |" in markdown
    assert len(list(csv.DictReader((folder / "sweep.csv").open()))) == 3


def test_working_dir_holds_the_code_and_configs(tmp_path):
    path = _write(tmp_path, name="w", config="configs/default.yaml", runs_root=str(tmp_path / "runs"))
    cfg = sweep.load_sweep_config(path, [], {})
    stage = tmp_path / "stage"
    stage.mkdir()
    rel = sweep.stage_working_dir(cfg, stage)
    assert rel == "configs/default.yaml" and (stage / rel).is_file()
    assert (stage / "stepforge" / "cli.py").is_file() and (stage / "stepforge" / "benchmark" / "tasks").is_dir()
    assert not (stage / "stepforge" / ".git").exists() and not (stage / "stepforge" / ".venv").exists()
    assert not (stage / "stepforge" / "runs").exists()
    installed = sweep.load_sweep_config(path, ["ray.code=installed"], {})
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    sweep.stage_working_dir(installed, stage2)
    assert not (stage2 / "stepforge").exists() and (stage2 / "configs" / "default.yaml").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A private Ray head with the dashboard (the Jobs API) on loopback; yields its dashboard URL."""
    names = ["port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
             "object-manager-port"]
    ports = {name: _free_port() for name in names}
    temp = Path("/tmp") / f"sf-ray-{os.getpid()}-{ports['port']}"  # short: Ray's socket paths have a length limit
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
           "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
    log = open(tmp_path / "ray-head.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a head as a user starts it
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        ready = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and head.poll() is None:
            try:
                import urllib.request

                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as resp:
                    ready = resp.status == 200
            except Exception:  # noqa: BLE001 - not up yet (or refusing without a token: still up)
                ready = _http_up(url)
            if ready:
                break
            time.sleep(1)
        if not ready:
            text = (tmp_path / "ray-head.log").read_text()[-1500:]
            pytest.skip(f"the Ray dashboard (Jobs API) did not start in this environment: {text}")
        yield url
    finally:
        _stop_group(head)
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _http_up(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answered (e.g. 401 without a token)
    except Exception:  # noqa: BLE001
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the head and everything it started (its own process group), nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def test_two_job_sweep_on_a_local_ray_cluster(ray_head, tmp_path):
    """The shipped configs/sweep_search.yaml as the README runs it (no `ray.python`), on a grid of two jobs."""
    runs = tmp_path / "runs"
    path = REPO / "configs" / "sweep_search.yaml"
    assert yaml.safe_load(path.read_text())["ray"].get("python") is None
    sets = [f"runs_root={runs}", "name=rt", "grid.variants=[agent]", "grid.m=[3]", "grid.seeds=[0, 1]",
            "grid.temperatures=[[0.4]]", 'set=["tasks=[moe-index/G_0_3_04]", "n=2", "max_rounds=1", "verifier.workers=1"]',
            "poll_s=1"]
    sets = [part for text in sets for part in ("--set", text)]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep.py"), "run", "--config", str(path), *sets,
                           "--address", ray_head, "--timeout", "300"], capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("submitted as rt-") == 2 and proc.stderr.count(": SUCCEEDED") == 2
    manifest = json.loads((runs / "_rt" / "sweep.json").read_text())
    assert [j["attempts"][-1]["status"] for j in manifest["jobs"]] == ["SUCCEEDED", "SUCCEEDED"]
    rows = list(csv.DictReader((runs / "_rt" / "sweep.csv").open()))
    assert [r["seed"] for r in rows] == ["0", "1"]
    for row, job in zip(rows, manifest["jobs"]):
        assert row["job_status"] == "SUCCEEDED" and row["run_status"] == "done"
        assert row["tasks"] == "1" and row["solved"] == "1" and row["samples"] == "2"
        run_cfg = yaml.safe_load((Path(job["run_dir"]) / "config.yaml").read_text())
        assert run_cfg["seed"] == int(row["seed"]) and run_cfg["variant"] == "agent" and run_cfg["n"] == 2
        assert (Path(job["run_dir"]) / "summary.json").is_file()
    table = (runs / "_rt" / "sweep.md").read_text()
    assert table.count("| SUCCEEDED | done |") == 2
    entry = manifest["jobs"][0]["attempts"][-1]["entrypoint"]
    assert entry[:6] == [sys.executable, "-m", "stepforge.cli", "improve", "--config", "configs/default.yaml"]
    env = {**os.environ}
    if env.get("RAY_AUTH_MODE") is None and (Path.home() / ".ray" / "auth_token").is_file():
        env["RAY_AUTH_MODE"] = "token"
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head, manifest["jobs"][0]["attempts"][-1]["submission_id"]],
                          capture_output=True, text=True, env=env, timeout=60)
    assert "stepforge.cli improve --config configs/default.yaml" in logs.stdout, logs.stderr

    # running the sweep again submits nothing: both runs are finished
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep.py"), "run", "--config", str(path), *sets,
                            "--address", ray_head, "--timeout", "60"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("not submitted") == 2 and "submitted as" not in again.stderr
