"""Reports and progress that fit the proposer: the search spends expansions and candidates (recorded per
sample as `cost`), models spend tokens; no plot or rate of something the run did not spend."""

from __future__ import annotations

import io
import json
from pathlib import Path

from stepforge.loop.interfaces import ProposalRequest
from stepforge.loop.progress import LogProgress, spend_text
from stepforge.loop.runstore import load_jsonl
from stepforge.loop.search import SearchProposer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_search_proposals_carry_their_share_of_the_search():
    from stepforge.benchmark.schema import load_benchmark

    task = load_benchmark()["moe-index/G_0_3_04"]
    proposer = SearchProposer({"max_expansions": 3000})
    (props,) = proposer.propose([ProposalRequest(task=task, task_key=task.key, n=3, temperature=0.7)])
    (stats,) = proposer.last_stats
    assert props and all(set(p.cost) == {"expansions", "generated", "candidates"} for p in props)
    assert abs(sum(p.cost["expansions"] for p in props) - stats.expansions) < 1e-6
    assert abs(sum(p.cost["candidates"] for p in props) - stats.candidates) < 1e-6
    assert all(p.prompt_tokens == p.completion_tokens == 0 for p in props)


def test_spend_text():
    assert spend_text(300, {}, 2.0) == "150 tok/s"
    assert spend_text(0, {"expansions": 5000.0, "candidates": 12.0}, 2.0) == "2500 expansions/s, 12 candidates"
    assert spend_text(0, {}, 1.0) == "0 tok/s"


def test_a_search_run_reports_expansions_not_tokens(tmp_path):
    from stepforge.loop.job import run_improve

    run = tmp_path / "run"
    outcome = run_improve(CONFIGS / "default.yaml", run_dir=run, progress=False,
                          overrides=["tasks=[moe-index/G_0_3_04, rope/G_0_3_02]", "max_rounds=1",
                                     "temperatures=[0.4]", "n=2", "verifier.workers=1"])
    samples = load_jsonl(run / "samples.jsonl")
    # a streamed proposal carries the search since the previous one (0 when one goal gives several programs)
    assert samples and all(r["cost"].get("expansions", 0) >= 0 for r in samples)
    assert sum(r["cost"].get("expansions", 0) for r in samples) > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary == outcome.summary
    total = sum(r["cost"].get("expansions", 0) for r in samples)
    assert abs(summary["run"]["cost"]["expansions"] - total) < 1e-3
    assert abs(sum(r["cost"]["expansions"] for r in summary["rounds"]) - total) < 1e-3
    assert summary["run"]["prompt_tokens"] == summary["run"]["completion_tokens"] == 0
    assert (run / "search.png").stat().st_size > 0 and not (run / "tokens.png").exists()
    report = (run / "report.md").read_text()
    assert "search.png" in report and "tokens.png" not in report and "expansions" in report

    out = io.StringIO()
    progress = LogProgress(2, stream=out)
    progress.step_started(0, 0, [], ["a"], len(samples), 0, 0)
    from stepforge.loop.runstore import SampleRecord

    progress.samples_recorded([SampleRecord.model_validate(r) for r in samples])
    progress.step_finished(0, 0, [], 0)
    line = out.getvalue().splitlines()[-1]
    assert "expansions/s" in line and "tok/s" not in line
