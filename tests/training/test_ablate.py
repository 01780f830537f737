"""`stepforge ablate`: four arms on one split with tiny budgets, one table and plot, resumable."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # end to end: real Ray, training or process kills

REPO = Path(__file__).resolve().parents[2]
STEPFORGE = str(Path(sys.executable).parent / "stepforge")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEST = ["rope/G_0_3_02", "moe-index/G_0_3_04"]  # benchmark order
TRAIN = ["moe-index/G_0_3_03"]


def _config(tmp_path: Path, model: Path, **changes) -> Path:
    data = {
        "name": "abl", "model": str(model), "prompt": {"knowledge": "none"},
        "split": {"train": TRAIN, "test": TEST},
        "sft": {"config": str(REPO / "configs" / "sft_tiny.yaml"), "set": ["max_steps=2"]},
        "improve": {
            "proposer": {"style": "ir", "backend": {"kind": "hf", "device": "cpu"}, "max_tokens": 24},
            "guardian": {"kind": "rule"}, "granularity": 1, "temperatures": [0.4], "n": 2, "max_rounds": 2,
            "seed": 0, "verifier": {"kind": "inline", "seeds": [0]}, "ray": {"num_cpus": 2}, "progress": False,
        },
    }
    data.update(changes)
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ablate(*args):
    return subprocess.run([STEPFORGE, "ablate", *args], capture_output=True, text=True, env=ENV, timeout=500, cwd=REPO)


def test_ablation_four_arms_table_plot_and_resume(tiny_model_dir, tmp_path):
    config = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "abl-run"
    proc = _ablate("--config", str(config), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base | base | agent |" in proc.stdout and "| sft+si | base+adapter | agent+si |" in proc.stdout

    rows = list(csv.DictReader((run / "ablation.csv").open()))
    assert [r["arm"] for r in rows] == ["base", "base+si", "sft", "sft+si"]
    data = json.loads((run / "ablation.json").read_text())
    assert data["split"] == {"train": TRAIN, "test": TEST} and data["n"] == 2 and data["temperatures"] == [0.4]
    md = (run / "ablation.md").read_text()
    assert all(f"| {arm} |" in md for arm in ("base", "base+si", "sft", "sft+si"))
    png = (run / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    adapter = run / "sft"
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "sft.json").read_text())["tasks"] == TRAIN  # trained on the train split only
    arm_dirs = {"base": "base", "base+si": "base_si", "sft": "sft", "sft+si": "sft_si"}
    for row in data["rows"]:
        arm_run = run / "arms" / arm_dirs[row["arm"]]
        cfg = yaml.safe_load((arm_run / "config.yaml").read_text())
        summary = json.loads((arm_run / "summary.json").read_text())
        # same budget and tasks for every arm; only the variant and the adapter differ
        assert cfg["tasks"] == TEST and cfg["n"] == 2 and cfg["temperatures"] == [0.4] and cfg["max_rounds"] == 2
        assert cfg["proposer"]["backend"]["model"] == str(tiny_model_dir)
        assert cfg["proposer"]["kind"] == "llm" and cfg["proposer"]["knowledge"] == "none"
        assert cfg["seed_buffer"] is None  # an explicit split: no source run to seed the +si arms from
        assert cfg["variant"] == ("agent+si" if row["arm"].endswith("+si") else "agent") == row["variant"]
        assert cfg["proposer"]["backend"]["lora_path"] == (str(adapter) if row["arm"].startswith("sft") else None)
        assert summary["status"] == "done" and summary["run"]["tasks"] == 2
        assert row["tasks"] == 2 and row["solved"] == summary["run"]["tasks_solved"]
        assert row["samples"] == summary["run"]["samples"] >= 4 and row["prompt_tokens"] > 0
        round0 = [s for s in (json.loads(x) for x in (arm_run / "samples.jsonl").read_text().splitlines()) if s["round"] == 0]
        assert len(round0) == 4  # 2 tasks x 1 temperature x n = 2
        assert 0.0 <= row["pass@1"] <= row["pass@n"] <= 1.0

    # resume: an interrupted arm is finished from its own files, finished arms and the adapter are reused
    sizes = {d: (run / "arms" / d / "samples.jsonl").stat().st_size for d in arm_dirs.values()}
    state_path = run / "arms" / "sft_si" / "state.json"
    state = json.loads(state_path.read_text())
    state["status"] = "running"
    state_path.write_text(json.dumps(state))
    (run / "arms" / "sft_si" / "summary.json").unlink()
    (run / "ablation.md").unlink()
    again = _ablate("--config", str(config), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the adapter" in again.stderr
    assert {d: (run / "arms" / d / "samples.jsonl").stat().st_size for d in arm_dirs.values()} == sizes
    assert json.loads((run / "ablation.json").read_text())["rows"] == data["rows"]
    assert (run / "ablation.md").is_file()

    # a different ablation may not reuse the directory
    other = _ablate("--config", str(config), "--run-dir", str(run), "--set", "improve.n=3")
    assert other.returncode == 2 and "holds a different ablation" in other.stderr and "Traceback" not in other.stderr


def test_split_from_a_source_run_and_config_errors(tiny_model_dir, tmp_path):
    from stepforge.loop.interfaces import BufferEntry
    from stepforge.training.ablate import (
        AblationError,
        arm_improve_dict,
        compute_split,
        load_ablation_config,
        seed_entries,
    )
    from stepforge.training.settings import TrainingConfigError

    source = tmp_path / "source"
    source.mkdir()
    entry = BufferEntry(task_key="moe-index/G_0_3_03", impl="return E0\n", success_count=1, n_samples=4,
                        success_rate=0.25, round=0, temperature=0.4)
    (source / "buffer.jsonl").write_text(entry.model_dump_json() + "\n")
    path = _config(tmp_path, tiny_model_dir, split={"source_run": str(source), "tasks": ["moe-index/*"]})
    cfg = load_ablation_config(path)
    split = compute_split(cfg)
    assert split == {"train": ["moe-index/G_0_3_03"],
                     "test": ["moe-index/G_0_13_02", "moe-index/G_0_3_04", "moe-index/G_0_7_03"]}
    arm = arm_improve_dict(cfg, cfg.improve, "sft+si", split["test"], tmp_path / "adapter")
    assert arm["variant"] == "agent+si" and arm["proposer"]["backend"]["lora_path"] == str(tmp_path / "adapter")
    assert arm["proposer"]["kind"] == "llm" and arm["proposer"]["knowledge"] == "none"
    assert "factory" not in arm["proposer"] and "knowledge" not in arm["proposer"].get("options", {})
    full = load_ablation_config(path, ["prompt.knowledge=full"])
    base_arm = arm_improve_dict(full, full.improve, "base", split["test"], None)
    assert base_arm["proposer"]["kind"] == "llm" and base_arm["proposer"]["knowledge"] == "full"

    # the +si arms start D from the source run's earned train entries (never from its own seeded ones)
    other = BufferEntry(task_key="moe-index/G_0_7_03", impl="return E0\n", success_count=1, n_samples=4,
                        success_rate=0.25, round=0, temperature=0.4, source="older/buffer.jsonl")
    (source / "buffer.jsonl").write_text(entry.model_dump_json() + "\n" + other.model_dump_json() + "\n")
    assert compute_split(cfg) == split  # a seeded entry of the source run is not its experience
    seed = seed_entries(cfg, split)
    assert [(e.task_key, e.source) for e in seed] == [("moe-index/G_0_3_03", str(source / "buffer.jsonl"))]
    for name in ("base", "base+si", "sft", "sft+si"):
        data = arm_improve_dict(cfg, cfg.improve, name, split["test"], None, tmp_path / "seed.jsonl")
        assert data.get("seed_buffer") == (str(tmp_path / "seed.jsonl") if name.endswith("+si") else None)
    assert seed_entries(load_ablation_config(path, ["seed_si=false"]), split) == []

    with pytest.raises(AblationError, match="train and test share moe-index/G_0_3_03"):
        compute_split(load_ablation_config(_config(tmp_path, tiny_model_dir, split={
            "train": ["moe-index/G_0_3_03"], "test": ["moe-index/G_0_3_0*"]})))
    with pytest.raises(TrainingConfigError, match="give either source_run or train/test"):
        load_ablation_config(_config(tmp_path, tiny_model_dir, split={"source_run": "x", "test": ["bmm/*"]}))
    with pytest.raises(TrainingConfigError, match=r"arms\[0\]"):
        load_ablation_config(_config(tmp_path, tiny_model_dir, arms=["sft-only"]))
    bad = _ablate("--config", str(_config(tmp_path, tiny_model_dir)), "--run-dir", str(tmp_path / "r"),
                  "--set", "improve.nn=2")
    assert bad.returncode == 2 and "unknown key 'nn'" in bad.stderr and "Traceback" not in bad.stderr


def test_si_arm_starts_from_the_source_runs_train_entries(tiny_model_dir, tmp_path):
    """With a source run, base+si's D starts with the train split's earned entries (demonstrations from
    round 1 on, never counted as solved)."""
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.interfaces import BufferEntry

    train = "moe-index/G_0_3_03"
    source = tmp_path / "source"
    source.mkdir()
    entry = BufferEntry(task_key=train, impl=load_benchmark()[train].impl, success_count=1, n_samples=4,
                        success_rate=0.25, round=0, temperature=0.4)
    (source / "buffer.jsonl").write_text(entry.model_dump_json() + "\n")
    config = _config(tmp_path, tiny_model_dir, split={"source_run": str(source), "tasks": [train, TEST[1]]},
                     arms=["base+si"])
    run = tmp_path / "abl-seeded"
    proc = _ablate("--config", str(config), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "D seeded with 1 train entries" in proc.stderr
    arm_run = run / "arms" / "base_si"
    cfg = yaml.safe_load((arm_run / "config.yaml").read_text())
    assert cfg["seed_buffer"] == str((run / "seed_buffer.jsonl").resolve()) and cfg["tasks"] == [TEST[1]]
    buffer = [json.loads(x) for x in (arm_run / "buffer.jsonl").read_text().splitlines()]
    assert buffer[0]["task_key"] == train and buffer[0]["source"] == str(source / "buffer.jsonl")
    steps = [json.loads(x) for x in (arm_run / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["demonstrations"] == []
    if len(steps) > 1:  # the random tiny model did not solve the test task in round 0
        assert steps[1]["demonstrations"][0] == train
    summary = json.loads((arm_run / "summary.json").read_text())
    assert summary["seeded"] == [train] and train not in summary["buffer"] and summary["run"]["tasks"] == 1
    row = json.loads((run / "ablation.json").read_text())["rows"][0]
    assert row["tasks"] == 1 and row["solved"] == len(summary["buffer"])
