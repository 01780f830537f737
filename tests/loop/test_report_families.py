"""The report per family and mode: one run's section, and the comparison of runs (`stepforge report --compare`)."""

from __future__ import annotations

import json

from support import edited_run_copy
from typer.testing import CliRunner

from stepforge.cli import app
from stepforge.loop.reporting.families import family_summary, render_families, run_label


def _task(round0_pass: float, earned: bool) -> dict:
    return {"earned": {"round": 0} if earned else None, "per_step": [{"round": 0, "step": 0, "pass@1": round0_pass}]}


def test_family_summary_counts_per_group_and_difficulty():
    summary = {"tasks": {"bmm/bmm_0": _task(1.0, True), "bmm/bmm_2": _task(0.0, False),
                         "moe-expert/G_0_6_05": _task(0.5, True), "elsewhere/unknown": _task(0.0, False)}}
    fams = family_summary(summary, "open")
    assert list(fams) == ["bmm", "elsewhere", "moe-expert"]
    assert (fams["bmm"]["tasks"], fams["bmm"]["solved"], fams["bmm"]["round0_pass@1"]) == (2, 1, 0.5)
    assert fams["bmm"]["difficulty"] == {"easy": [1, 1], "medium": [0, 1], "hard": [0, 0]}  # bmm_2: 9 lines
    assert fams["moe-expert"]["difficulty"]["hard"] == [1, 1] and fams["moe-expert"]["mode"] == "open"
    assert fams["elsewhere"]["difficulty"] == {"easy": [0, 0], "medium": [0, 0], "hard": [0, 0]}  # not a task
    text = "\n".join(render_families({"families": fams}))
    assert "| bmm | open | 2 | 1 | 0.500 | 1/1 | 0/1 | - |" in text and "| open | 4 | 2 |" in text


def test_run_labels_name_the_model_or_the_search_and_the_mode():
    assert run_label({"name": "a"}, "x") == "a: search (closed)"
    cfg = {"name": "q", "mode": "open", "proposer": {"kind": "llm", "backend": {"kind": "vllm", "model": "/m/Qwen7B",
                                                                                 "lora_path": "/ad"}}}
    assert run_label(cfg, "x") == "q: Qwen7B+lora (open)"


def test_report_compares_runs_per_family(search_run, tmp_path):
    other = edited_run_copy(search_run, tmp_path / "other", {}, "other", mode="open")
    (other / "buffer.jsonl").write_text("")  # this run solved nothing
    res = CliRunner().invoke(app, ["report", str(search_run), str(other), "--compare", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    md = (tmp_path / "cmp" / "families.md").read_text()
    assert "| family | default: search (closed) | other: search (open) |" in md
    assert "| bmm | 1/1 | 0/1 |" in md and "| rope | 0/1 | 0/1 |" in md
    assert (tmp_path / "cmp" / "families.png").stat().st_size > 0
    data = json.loads((tmp_path / "cmp" / "families.json").read_text())
    assert data["other: search (open)"]["bmm"]["solved"] == 0
    report = (search_run / "report.md").read_text()
    assert "## Per family and mode" in report and "## Per task group" in report and "## Per task" in report
    summary = json.loads((search_run / "summary.json").read_text())
    assert summary["families"]["bmm"]["mode"] == "closed" and (search_run / "families.png").is_file()
