"""`stepforge improve` through the CLI with the tiny model on Ray, and the Ray verifier actors.

The tiny random model solves nothing; what is checked is the plumbing: the
run directory, samples with real token counts (the prompt's count equals the
tokenizer's count of the recorded chat messages), summary and samples in
agreement, the report and its plots. One local Ray instance (num_cpus=2) is
shared by the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepforge.cli import app
from stepforge.loop.runstore import load_jsonl

pytestmark = pytest.mark.slow  # end to end: real Ray, training or process kills

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_FILES = ("config.yaml", "samples.jsonl", "prompts.jsonl", "steps.jsonl", "buffer.jsonl", "state.json",
             "summary.json", "report.md", "tasks_solved.png", "tokens.png")


def test_cpu_smoke_end_to_end_through_the_cli(ray_local, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["improve", "--config", str(CONFIGS / "cpu_smoke.yaml"), "--run-dir", str(run),
                              "--set", f"proposer.backend.model={tiny_model_dir}", "--set", "temperatures=[0.4, 1.0]",
                              "--set", "n=1", "--set", "proposer.max_tokens=12", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for name in RUN_FILES:
        assert (run / name).is_file(), name

    samples = load_jsonl(run / "samples.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    steps = load_jsonl(run / "steps.jsonl")
    state = json.loads((run / "state.json").read_text())
    tasks = ["bmm/bmm_0", "rope/G_0_3_02", "moe-index/G_0_3_03"]  # benchmark order
    # round 0 and one self-improvement round (nothing solved: one step without demonstrations), 3 tasks x 2 temps x 1
    assert [(s["round"], s["step"], s["demonstrations"], s["tasks"]) for s in steps] == \
        [(0, 0, [], tasks), (1, 0, [], tasks)]
    assert len(samples) == 12 == summary["run"]["samples"] == sum(s["samples"] for s in steps)
    assert sorted({(r["round"], r["task"], r["temperature"]) for r in samples}) == \
        sorted({(rnd, t, temp) for rnd in (0, 1) for t in tasks for temp in (0.4, 1.0)})
    assert summary["run"]["tasks"] == 3 and summary["run"]["tasks_solved"] == 0
    assert summary["status"] == state["status"] == "done" and state["unsolved"] == tasks
    assert summary["buffer"] == [] and (run / "buffer.jsonl").read_text() == ""
    assert summary["run"]["verifications"] == sum(1 for r in samples if r["verified"])
    assert summary["run"]["completion_tokens"] == sum(r["completion_tokens"] for r in samples)
    assert sum(t["samples"] for t in summary["tasks"].values()) == 12

    # token counts are the model tokenizer's: prompt = the chat template applied to the recorded messages
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = {p["prompt_id"]: p["messages"] for p in load_jsonl(run / "prompts.jsonl")}
    for rec in samples:
        assert rec["prompt_id"] in prompts
        messages = prompts[rec["prompt_id"]]
        assert messages[0]["role"] == "system" and rec["task"].split("/")[1] in messages[-1]["content"]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = len(tok(text, add_special_tokens=False)["input_ids"])
        assert rec["prompt_tokens"] > 0 and rec["prompt_tokens"] == expected
        assert 1 <= rec["completion_tokens"] <= 12
        assert rec["verdict"]["stage"] in ("parse", "type", "affine", "arity", "dtype", "shape", "value", "runtime",
                                           "resource", "timeout")
    # the prompt of each request is counted once in the run's prompt tokens
    per_request = {(r["round"], r["task"], r["temperature"]): r["prompt_tokens"] for r in samples}
    assert summary["run"]["prompt_tokens"] == sum(per_request.values())
    report = (run / "report.md").read_text()
    assert "## Tasks solved per round" in report and "bmm/bmm_0" in report and "tasks_solved.png" in report

    for name in ("report.md", "summary.json", "tasks_solved.png", "tokens.png"):
        (run / name).unlink()
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    for name in ("report.md", "summary.json", "tasks_solved.png", "tokens.png"):
        assert (run / name).stat().st_size > 0
    assert json.loads((run / "summary.json").read_text()) == summary


def test_ray_verifier_actors_verify_and_replace_a_worker_past_its_time_limit(ray_local):
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.verifiers import RayVerifier

    task = load_benchmark()["rope/G_0_3_02"]
    wrong = "x = step.Zip().apply((E0, E1))\nreturn x\n"
    verifier = RayVerifier(1, timeout_s=120, verify_kwargs={"seeds": (0,)}, num_cpus=0.5)

    def drain(items):
        verifier.submit(items)
        got = {}
        while verifier.pending():
            got.update(dict(verifier.poll(0.5)))
        return got

    try:
        got = drain([(1, task.key, task.impl), (2, task.key, wrong)])
        assert got[1].passed and got[1].stage == "ok"
        assert not got[2].passed and got[2].stage in ("type", "dtype", "shape", "arity")
        verifier.timeout_s = 1e-4
        got = drain([(3, task.key, task.impl)])
        assert got[3].stage == "timeout" and not got[3].passed and verifier.replacements == 1
        verifier.timeout_s = 120
        got = drain([(4, task.key, task.impl)])
        assert got[4].passed  # the replacement actor works
    finally:
        verifier.close()


def test_ray_verifier_actors_share_the_candidates_of_two_tasks(ray_local):
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.verifiers import RayVerifier

    tasks = load_benchmark()
    a, b = tasks["rope/G_0_3_02"], tasks["moe-index/G_0_3_04"]
    verifier = RayVerifier(2, timeout_s=120, verify_kwargs={"seeds": (0,)}, num_cpus=0.5)
    try:
        while any(slot.ready_ref is not None for slot in verifier.slots):  # both actors up first
            verifier.poll(0.5)
        items = [(i, (a if i % 2 else b).key, (a if i % 2 else b).impl) for i in range(8)]
        verifier.submit(items)
        got = {}
        while verifier.pending():
            got.update(dict(verifier.poll(0.5)))
        assert sorted(got) == list(range(8)) and all(v.passed for v in got.values())
        # the first two went to different actors; each holds what it verified (dispatch order: test_verifier_dispatch.py)
        assert all(slot.known for slot in verifier.slots) and set.union(*(s.known for s in verifier.slots)) == {a.key, b.key}
    finally:
        verifier.close()


def test_tiny_model_in_open_mode_runs_the_whole_path(ray_local, tiny_model_dir, tmp_path):
    """Open mode with the tiny model: open prompts, candidates parsed leniently, nothing solved, a report."""
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["improve", "--config", str(CONFIGS / "cpu_smoke.yaml"), "--run-dir", str(run),
                                   "--set", f"proposer.backend.model={tiny_model_dir}", "--set", "mode=open",
                                   "--set", "temperatures=[0.4]", "--set", "n=1", "--set", "max_rounds=1",
                                   "--set", "proposer.max_tokens=12", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    samples = load_jsonl(run / "samples.jsonl")
    assert len(samples) == 3 and all(r["mode"] == "open" and not r["correct"] for r in samples)
    assert all(r["verdict"]["stage"] in ("parse", "fns") for r in samples)  # 12 random tokens hold no candidate
    prompts = {p["prompt_id"]: p["messages"] for p in load_jsonl(run / "prompts.jsonl")}
    for rec in samples:
        user = prompts[rec["prompt_id"]][-1]["content"]
        assert "Write the fns and the impl of the open task" in user
        assert "fns:" not in user.rsplit("Task:", 1)[1] and rec["prompt_tokens"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "open" and summary["run"]["tasks_solved"] == 0
    assert "## Result (open mode)" in (run / "report.md").read_text()


def test_cpu_smoke_with_repair_turns_reports_the_turns(ray_local, tiny_model_dir, tmp_path):
    """`--set repair_turns=2` on the tiny model: every failed sample gets two follow-ups, shown per turn."""
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["improve", "--config", str(CONFIGS / "cpu_smoke.yaml"), "--run-dir", str(run),
                                   "--set", f"proposer.backend.model={tiny_model_dir}", "--set", "repair_turns=2",
                                   "--set", "temperatures=[0.4]", "--set", "n=1", "--set", "max_rounds=1",
                                   "--set", "proposer.max_tokens=8", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    samples = load_jsonl(run / "samples.jsonl")
    assert sorted(r["turn"] for r in samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # the random model solves nothing
    keys = {(r["task"], r["turn"]): r for r in samples}
    for r in samples:
        if r["turn"]:
            parent = keys[(r["task"], r["turn"] - 1)]
            assert r["parent"] == f"r0/s0/{r['task']}/t0.4/i0" + (f"/k{r['turn'] - 1}" if r["turn"] > 1 else "")
            prompts = {p["prompt_id"]: p["messages"] for p in load_jsonl(run / "prompts.jsonl")}
            conversation = prompts[r["prompt_id"]]
            assert len(conversation) == 2 + 2 * r["turn"] and conversation[-2]["content"].strip() == \
                parent["raw"].strip()
            assert f"`{parent['verdict']['stage']}` stage" in conversation[-1]["content"]
            assert r["prompt_tokens"] > parent["prompt_tokens"]
    # the estimate printed before the first request: round 0's first prompts, by the model pool's tokenizer
    first_prompts = sum(r["prompt_tokens"] for r in samples if r["turn"] == 0)
    assert f"estimate: round 0 sends 3 requests for 3 samples, {first_prompts} prompt tokens" in res.output
    summary = json.loads((run / "summary.json").read_text())
    assert [t["samples"] for t in summary["repair"]["per_turn"]] == [3, 3, 3]
    report = (run / "report.md").read_text()
    assert "## Repair turns" in report and "| 2 | 3 | 0 | 0 |" in report
