"""`stepforge library`: a search run's earned programs as a library that verifies on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import edited_run_copy as _edited_copy
from typer.testing import CliRunner

from stepforge.benchmark.schema import load_benchmark, load_task
from stepforge.cli import app
from stepforge.loop.library import INDEX, PROVENANCE, LibraryError, build_library, read_run
from stepforge.loop.runstore import load_jsonl

PACKAGE_PARENT = str(Path(__file__).resolve().parents[3])
# bmm/bmm_0 with a needless Bufferize/Streamify round trip: correct, two statements longer than the search's
LONG_BMM0 = """\
buf1 = step.Bufferize(a=1).apply(E1)
buf2 = step.Bufferize(a=1).apply(E0)
zip1 = step.Zip().apply((buf2, buf1))
y1 = step.Map(fn=fn_outer).apply(zip1)
acc1 = step.Accum(fn=fn_add, b=1).apply(y1)
S1 = step.Streamify().apply(acc1)
b2 = step.Bufferize(a=1).apply(S1)
S0 = step.Streamify().apply(b2)
return S0
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_library_of_a_search_run_verifies_with_stepforge_verify_and_plain_pytest(search_run, tmp_path):
    out = tmp_path / "lib"
    res = CliRunner().invoke(app, ["library", str(search_run), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    entries = {e["task_key"]: e for e in load_jsonl(search_run / "buffer.jsonl")}
    prov = json.loads((out / PROVENANCE).read_text())
    assert sorted(r["operator"] for r in prov["operators"]) == sorted(entries) and prov["not_written"] == []
    bench = load_benchmark()
    index = (out / INDEX).read_text()
    for record in prov["operators"]:
        key = record["operator"]
        task = load_task(out / record["file"])
        assert task.impl == entries[key]["impl"] and task.fingerprint() == bench[key].fingerprint()
        assert record["verification"]["seeds"] == [0, 1, 2] and record["earned"]["proposer"] == "search"
        assert record["verification"]["bindings"] == [{}] + [dict(b) for b in bench[key].bindings]
        assert f"| {key} | {bench[key].group} | closed |" in index
        done = subprocess.run([sys.executable, "-m", "stepforge.cli", "verify", str(out / record["file"])],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0 and "PASS" in done.stdout, done.stdout + done.stderr
    assert sorted(load_benchmark(out)) == sorted(entries)  # the library is a benchmark folder too
    tests = sorted(p.name for p in (out / "tests").iterdir())
    assert len(tests) == len(entries)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=out,
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_a_tampered_entry_is_listed_not_written_and_a_merge_keeps_the_shorter_program(search_run, tmp_path):
    solved = [e["task_key"] for e in load_jsonl(search_run / "buffer.jsonl")]
    assert {"bmm/bmm_0", "moe-index/G_0_3_03"} <= set(solved)
    wrong = "S0 = step.Map(fn=fn_gate).apply(E0)\nreturn S0\n"  # no top-1: wrong values
    other = _edited_copy(search_run, tmp_path / "other", {"bmm/bmm_0": LONG_BMM0, "moe-index/G_0_3_03": wrong}, "other")

    lib = build_library([other], tmp_path / "alone", timeout_s=60)
    assert [c.key for c in lib.rejected] == ["moe-index/G_0_3_03"]
    assert "no longer verifies: FAIL" in lib.rejected[0].problem
    assert not (tmp_path / "alone" / "moe-index" / "G_0_3_03.yaml").exists()
    assert load_task(tmp_path / "alone" / "bmm" / "bmm_0.yaml").impl == LONG_BMM0
    prov = json.loads((tmp_path / "alone" / PROVENANCE).read_text())
    assert [r["operator"] for r in prov["not_written"]] == ["moe-index/G_0_3_03"]
    assert "moe-index/G_0_3_03" not in [r["operator"] for r in prov["operators"]]
    assert "## Not written (1)" in (tmp_path / "alone" / INDEX).read_text()

    merged = build_library([other, search_run], tmp_path / "merged", timeout_s=60)
    kept = {c.key: c for c in merged.written}
    earned = {e["task_key"]: e["impl"] for e in load_jsonl(search_run / "buffer.jsonl")}
    assert kept["bmm/bmm_0"].run.name == "default" and kept["bmm/bmm_0"].impl == earned["bmm/bmm_0"]
    assert load_task(tmp_path / "merged" / "bmm" / "bmm_0.yaml").impl == earned["bmm/bmm_0"]
    assert kept["moe-index/G_0_3_03"].run.name == "default"  # the other run's copy failed, this one is kept
    assert [(c.key, c.run.name) for c in merged.superseded] == [("bmm/bmm_0", "other")]
    index = (tmp_path / "merged" / INDEX).read_text()
    assert "## Superseded by a shorter verified program (1)" in index and "| other | closed |" in index


def test_open_entries_are_verified_as_open_candidates_or_listed(search_run, tmp_path):
    bench = load_benchmark()
    run = _edited_copy(search_run, tmp_path / "open", {}, "open-run", mode="open")
    entries = load_jsonl(run / "buffer.jsonl")
    for e in entries:  # the task's own fns as the model-written ones
        e["fns"] = [f.model_dump(mode="json", by_alias=True, exclude_none=True) for f in bench[e["task_key"]].fns]
    bad = next(e for e in entries if e["task_key"] == "moe-index/G_0_3_03")
    bad["fns"][0]["apply"] = "import os\nreturn [input[0]]"  # outside the fn language: never run
    (run / "buffer.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    info, read = read_run(run)
    assert info.mode == "open" and all(e["fns"] for e in read)
    lib = build_library([run], tmp_path / "lib", timeout_s=60)
    try:
        import stepforge.benchmark.open_mode  # noqa: F401
    except ImportError:
        assert not lib.written and all("open mode is not available" in c.problem for c in lib.rejected)
        return
    assert sorted(c.key for c in lib.written) == sorted(e["task_key"] for e in entries if e is not bad)
    assert [c.key for c in lib.rejected] == [bad["task_key"]] and "FAIL fns" in lib.rejected[0].problem
    assert not (tmp_path / "lib" / "open" / "moe-index").exists()
    for c in lib.written:
        assert (tmp_path / "lib" / "open" / c.task.group / f"{c.task.test_name}.yaml").is_file()


def test_run_errors_and_seeded_entries(search_run, tmp_path):
    with pytest.raises(LibraryError, match="not a run directory"):
        read_run(tmp_path)
    seeded = _edited_copy(search_run, tmp_path / "seeded", {}, "seeded")
    entries = load_jsonl(seeded / "buffer.jsonl")
    entries[0]["source"] = "/elsewhere/buffer.jsonl"
    (seeded / "buffer.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert [e["task_key"] for e in read_run(seeded)[1]] == [e["task_key"] for e in entries[1:]]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(LibraryError, match="not an empty folder"):
        build_library([search_run], tmp_path / "full")
    bad = _edited_copy(search_run, tmp_path / "bad", {}, "bad", mode="half-open")
    with pytest.raises(LibraryError, match="mode: expected closed or open"):
        read_run(bad)
