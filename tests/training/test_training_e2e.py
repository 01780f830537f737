"""Learning end to end: train the tiny model with LoRA until it reproduces two tasks' reference
solutions, then `stepforge improve` with the adapter (Ray model actor, transformers backend,
sampled at temperature 0.4) must earn verified programs for both tasks.

training (trl + peft) -> adapter on disk -> serving (lora_path) -> real sampling -> the loop's reply
parsing, rule guardian and verifier -> buffer and summary.
"""

from __future__ import annotations

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
TASKS = ["moe-index/G_0_3_04", "moe-index/G_0_3_03"]  # short prompts and programs: fast on CPU
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args, timeout=400):
    proc = subprocess.run([STEPFORGE, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_sft_then_improve_with_the_adapter_solves_the_tasks(tiny_model_dir, tmp_path):
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.agents.replies import extract_program
    from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
    from stepforge.training.data import read_dataset

    adapter = tmp_path / "adapter"
    _run("train", "sft", "--model", str(tiny_model_dir), "--out", str(adapter), "--config", "configs/sft_tiny.yaml",
         "--extra-tasks", ",".join(TASKS), "--merge")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file() and (adapter / "merged" / "config.json").is_file()
    record = json.loads((adapter / "sft.json").read_text())
    assert record["steps"] == 70 and record["tasks"] == sorted(TASKS)
    losses = [h["loss"] for h in record["loss_history"]]
    assert losses[-1] < 0.5 * losses[0], losses

    # greedy generation: the tuned model (adapter, and merged) reproduces the programs; the base model does not
    examples = read_dataset(adapter / "dataset.jsonl")
    reqs = [GenerationRequest(messages=ex.prompt, request_id=ex.task_key,
                              sampling=SamplingParams(n=1, temperature=0.0, max_tokens=96)) for ex in examples]
    outputs = {}
    for label, cfg in (("base", BackendConfig(kind="hf", model=str(tiny_model_dir), device="cpu")),
                       ("lora", BackendConfig(kind="hf", model=str(tiny_model_dir), lora_path=str(adapter), device="cpu")),
                       ("merged", BackendConfig(kind="hf", model=str(adapter / "merged"), device="cpu"))):
        backend = make_backend(cfg)
        outputs[label] = [r.completions[0].text for r in backend.generate(reqs)]
        backend.close()
    for ex, base, lora, merged in zip(examples, outputs["base"], outputs["lora"], outputs["merged"]):
        tuned = extract_program(lora)
        assert tuned is not None and tuned.program == ex.impl, lora
        assert merged == lora
        untuned = extract_program(base)
        assert untuned is None or untuned.program != ex.impl

    # the loop with the adapter: sampled (temperature 0.4), parsed, guarded and verified
    config = {
        "name": "tiny-sft-eval", "tasks": TASKS, "variant": "agent",
        "proposer": {"kind": "llm", "style": "ir", "knowledge": "none", "max_tokens": 96,
                     "backend": {"kind": "hf", "model": str(tiny_model_dir), "lora_path": str(adapter), "device": "cpu"}},
        "guardian": {"kind": "rule"}, "temperatures": [0.4], "n": 2, "max_rounds": 1, "seed": 0,
        "verifier": {"kind": "pool", "workers": 1, "timeout_s": 60, "seeds": [0, 1]},
        "ray": {"num_cpus": 2}, "progress": False,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "eval-run"
    _run("improve", "--config", str(path), "--run-dir", str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["tasks_solved"] == 2 and summary["run"]["completion_tokens"] > 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and sum(s["correct"] for s in samples) >= 2
    assert all(s["temperature"] == 0.4 and s["completion_tokens"] > 0 for s in samples)
    reference = load_benchmark()
    buffer = [json.loads(line) for line in (run_dir / "buffer.jsonl").read_text().splitlines()]
    assert sorted(e["task_key"] for e in buffer) == sorted(TASKS)
    for entry in buffer:
        assert entry["impl"] == reference[entry["task_key"]].impl
        ex = next(e for e in examples if e.task_key == entry["task_key"])
        assert entry["messages"] == ex.prompt  # evaluated on the prompt it was trained on
