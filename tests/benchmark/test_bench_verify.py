"""scripts/bench_verify.py runs every mode and ends with the open-mode line, the pool line and the
throughput line (the figures themselves are not tested)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_verify.py"


def test_script_prints_the_pool_and_throughput_lines_last():
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "bmm/bmm_0", "--repeats", "1", "--workers", "1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if re.match(r"(verify|pytest harness|open mode) +\d", line)}
    assert rows["verify"][-2:] == ["1", "1"] and rows["pytest"][-2:] == ["1", "1"]  # candidates, passed
    assert rows["open"][-2:] == ["1", "1"]
    assert re.fullmatch(r"open mode: \d+\.\d/s in one process \(\d+\.\d\dx closed\), pool \d+\.\d/s "
                        r"\(\d+\.\d\dx closed\); 1 passed", lines[-3])
    assert re.fullmatch(r"pool of 1 workers: \d+\.\d/s, \d+\.\d\dx one process", lines[-2])
    assert re.fullmatch(r"verify throughput \d+\.\d/s, pytest harness \d+\.\d/s, ratio \d+\.\dx", lines[-1])


def test_tasks_selects_a_split():
    """`--tasks new` leaves out the published tasks: bmm/bmm_0 is not among the candidates."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--tasks", "new", "--only", "bmm/", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 1 and "no reference solutions to verify" in out.stdout
    out = subprocess.run([sys.executable, str(SCRIPT), "--tasks", "no-such-split"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 2 and "no-such-split" in out.stderr and "Traceback" not in out.stderr
