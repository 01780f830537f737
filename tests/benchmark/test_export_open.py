"""`stepforge export --open`: an open solution exported with its own fns, checked by the fn language."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stepforge.benchmark.export import export_test
from stepforge.benchmark.open_mode import reference_candidate
from stepforge.benchmark.schema import load_benchmark
from stepforge.cli import app


def test_exported_open_solution_carries_its_fns_and_fails_when_they_are_wrong(tmp_path):
    task = load_benchmark()["gemm/G_0_6_02"]
    cand = reference_candidate(task).to_yaml().replace("fn_mul", "my_mul")  # fns of its own, not the task's
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(cand)
    bad.write_text(cand.replace("input[0] * input[1]", "input[0] + input[1]"))
    runner = CliRunner()
    for name, src in (("test_good.py", good), ("test_bad.py", bad)):
        res = runner.invoke(app, ["export", "gemm/G_0_6_02", "--open", "--impl", str(src), "--out",
                                  str(tmp_path / name), "--seeds", "1"])
        assert res.exit_code == 0, res.output
    text = (tmp_path / "test_good.py").read_text()
    assert "my_mul" in text and "verify_open" in text
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    assert subprocess.run(run + [str(tmp_path / "test_good.py")], capture_output=True, cwd=tmp_path).returncode == 0
    failed = subprocess.run(run + [str(tmp_path / "test_bad.py")], capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 1 and "value" in failed.stdout


def test_export_open_refuses_what_is_not_a_candidate():
    task = load_benchmark()["gemm/G_0_6_02"]
    with pytest.raises(ValueError, match="not an open candidate"):
        export_test(task, task.impl, open_mode=True)
