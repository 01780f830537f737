"""`stepforge tasks`, `stepforge verify`, `stepforge export` (through typer's test runner) and the exported pytest file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
import yaml
from typer.testing import CliRunner

from stepforge.benchmark.cli import register
from stepforge.benchmark.schema import load_benchmark

TASKS = load_benchmark()
runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def test_root_cli_has_the_benchmark_commands():
    from stepforge.cli import app as root

    result = runner.invoke(root, ["--help"])
    assert result.exit_code == 0
    for name in ("tasks", "verify", "export"):
        assert name in result.output


def test_tasks_lists_every_key(app):
    result = runner.invoke(app, ["tasks", "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["key"] for r in rows] == list(TASKS)
    g = next(r for r in rows if r["key"] == "norm/G_0_16_01")
    assert (g["fns"], g["lines"], g["copies"]) == (7, 16, 3)
    table = runner.invoke(app, ["tasks"])
    assert table.exit_code == 0 and "moe-end-to-end/G_0_12_01" in table.output and f"{len(TASKS)} tasks" in table.output


def test_verify_reference_passes(app):
    result = runner.invoke(app, ["verify", "norm/G_0_8_01"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


def test_verify_candidate_file_that_fails_exits_1_and_json(app, tmp_path):
    impl = tmp_path / "prog.step"
    impl.write_text(TASKS["norm/G_0_8_01"].impl.replace("x_a, x_b = step.Copy().apply(E0)\n", "")
                    .replace("apply(x_a)", "apply(E0)").replace("(x_b, rms_rep)", "(E0, rms_rep)"))
    result = runner.invoke(app, ["verify", "norm/G_0_8_01", "--impl", str(impl), "--json", "--seeds", "2"])
    assert result.exit_code == 1
    verdict = json.loads(result.output)
    assert verdict["stage"] == "affine" and verdict["functional_ok"] is True and verdict["runs"] == 6
    lenient = runner.invoke(app, ["verify", "norm/G_0_8_01", "--impl", str(impl), "--no-affine"])
    assert lenient.exit_code == 0 and "affine rule not checked" in lenient.output


def test_verify_accepts_a_solution_yaml_and_a_task_file_and_bindings(app, tmp_path):
    task = TASKS["gemm/G_0_6_02"]
    solution = tmp_path / "solution.yaml"
    solution.write_text(yaml.safe_dump({"impl": task.impl}))
    task_file = tmp_path / "G_0_6_02.yaml"
    task_file.write_text(task.to_yaml())
    result = runner.invoke(app, ["verify", str(task_file), "--impl", str(solution), "--binding", "K=64;M=2,N=3"])
    assert result.exit_code == 0, result.output
    assert "2 size binding(s)" in result.output


def test_bad_task_file_exits_2_with_one_line(app, tmp_path):
    data = yaml.safe_load(TASKS["norm/G_0_8_01"].to_yaml())
    data["fns"][2]["init"] = "zero"
    data["outputs"][0]["dims"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["verify", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0] and "fns[2].init" in lines[0] and "1 more problem" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,expected", [
    (["verify", "no/such_task"], "no task"),
    (["verify"], "give a task key"),
    (["verify", "norm/G_0_8_01", "--impl", "/nonexistent/prog"], "no such file"),
    (["verify", "norm/G_0_8_01", "--binding", "D=x"], "--binding"),
    (["verify", "--all", "norm/G_0_8_01"], "--all"),
])
def test_usage_errors_exit_2(app, args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert expected in result.stderr


def test_verify_all_table(app):
    result = runner.invoke(app, ["verify", "--all", "--seeds", "1"])
    assert result.exit_code == 0, result.output
    assert f"{len(TASKS)}/{len(TASKS)} passed" in result.output


def test_export_writes_a_standalone_pytest_file_that_passes_or_fails(app, tmp_path):
    task = TASKS["rope/G_0_4_01"]
    good = tmp_path / "good.step"
    good.write_text(task.impl)
    wrong = tmp_path / "wrong.step"
    wrong.write_text(task.impl.replace("step.Scan(fn=fn_position, b=1)", "step.Scan(fn=fn_rotate, b=1)"))
    out_dir = tmp_path / "exported"
    for name, impl in (("test_good.py", good), ("test_wrong.py", wrong)):
        result = runner.invoke(app, ["export", "rope/G_0_4_01", "--impl", str(impl), "--out", str(out_dir / name)])
        assert result.exit_code == 0, result.output
    text = (out_dir / "test_good.py").read_text()
    assert "TASK_YAML" in text and "step.RepeatRef()" in text and "impl:" not in text.split("IMPL =")[0]
    assert runner.invoke(app, ["export", "rope/G_0_4_01", "--out", str(out_dir / "bad_name.py")]).exit_code == 2

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out_dir)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1]
    # good: 3 bindings + affine pass; wrong: 3 bindings fail (fn_rotate is not a fold), affine passes
    assert "3 failed" in summary and "5 passed" in summary, proc.stdout[-2000:]
    assert "test_wrong.py::test_program_matches_the_oracle" in proc.stdout


# -- the time limit: verify runs in the process pool ------------------------------------------

def _norm_file(tmp_path, **changes):
    data = yaml.safe_load(TASKS["norm/G_0_8_01"].to_yaml())
    for key, value in changes.items():
        if key == "oracle":
            data["outputs"][0]["data_transform"] = value
        else:
            data[key] = value
    path = tmp_path / "G_0_8_01.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SLOW_PROGRAM = "R = step.Repeat(n=100000).apply(E0)\n" + "".join(
    f"A{i} = step.Map(fn=fn_square).apply(R)\n" for i in range(250)) + "return E0\n"


@pytest.mark.parametrize("hostile", ["oracle", "global", "oracle_sleeps", "program"])
def test_verify_stops_at_the_time_limit_with_stage_timeout(app, tmp_path, hostile):
    impl = tmp_path / "slow.step"
    impl.write_text(SLOW_PROGRAM)
    args = {
        "oracle": [str(_norm_file(tmp_path, oracle="while True:\n    pass\ninput_data['E0']\n"))],
        "global": [str(_norm_file(tmp_path, **{"global": "n = 0\nwhile n >= 0:\n    n += 1\n"}))],
        "oracle_sleeps": [str(_norm_file(tmp_path, oracle="import time\ntime.sleep(3600)\ninput_data['E0']\n"))],
        "program": ["norm/G_0_8_01", "--impl", str(impl)],
    }[hostile]
    result = runner.invoke(app, ["verify", *args, "--timeout", "1.5", "--json", "--seeds", "1"])
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    assert verdict["stage"] == "timeout" and not verdict["passed"]
    assert "time limit of 1.5 s" in verdict["message"]


def test_verify_cli_in_a_subprocess_returns_timeout_for_an_endless_oracle(tmp_path):
    """End to end: the real command, with a guard so that a hang fails the test instead of stalling it."""
    task = _norm_file(tmp_path, oracle="while True:\n    pass\ninput_data['E0']\n")
    proc = subprocess.run([sys.executable, "-m", "stepforge.cli", "verify", str(task), "--timeout", "1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL timeout" in proc.stdout and "time limit of 1 s" in proc.stdout


def test_verify_under_the_default_limit_passes_and_a_broken_oracle_names_the_file(app, tmp_path):
    result = runner.invoke(app, ["verify", "norm/G_0_8_01", "--seeds", "1"])
    assert result.exit_code == 0 and "PASS" in result.stdout
    broken = _norm_file(tmp_path, oracle="raise ValueError('no oracle')\ninput_data['E0']\n")
    result = runner.invoke(app, ["verify", str(broken), "--seeds", "1"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"error: {broken}: outputs[0].data_transform[0]: raised ValueError: no oracle")


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
def test_bad_timeout_exits_2(app, value):
    result = runner.invoke(app, ["verify", "norm/G_0_8_01", "--timeout", value])
    assert result.exit_code == 2
    assert "--timeout" in result.stderr or "timeout" in result.output


@pytest.mark.parametrize("binding", ["D=" + "9" * 5000, "D=²", "D=2147483649", "D=0"])
def test_hostile_binding_values_exit_2_in_one_short_line(app, binding):
    result = runner.invoke(app, ["verify", "norm/G_0_8_01", "--binding", binding])
    assert result.exit_code == 2 and "--binding" in result.stderr and len(result.stderr) < 200
