"""SFT data: exact proposer prompts, answers that parse back, masked prompt labels, settings and CLI errors.

The buffer comes from a real `stepforge improve` run (in process, inline
verifier) with `proposer.kind: llm`: the driver builds its own `LLMProposer`
(with the knowledge of `proposer.knowledge`) on a model pool that is replaced
by a scripted backend answering with the reference solution (and, for one
task, only when the prompt carries demonstrations), so the loop itself
records the prompts and the demonstrations of every buffer entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stepforge.loop.interfaces import BufferEntry

STEPFORGE = str(Path(sys.executable).parent / "stepforge")
EASY = ["moe-index/G_0_3_04", "rope/G_0_3_02"]
HARD = "moe-index/G_0_3_03"  # the scripted model solves it only with demonstrations


class ScriptedBackend:
    """A 'model' that knows the reference solutions: the reply is the impl in prose + a fence."""

    def __init__(self, tasks):
        self.tasks = tasks

    def generate(self, requests):
        from stepforge.serve.base import Completion, GenerationResult

        out = []
        for r in requests:
            key = r.request_id.rsplit("#", 1)[0]
            has_demos = "Solved tasks, hardest first" in r.messages[-1]["content"]
            body = self.tasks[key].impl if (key != HARD or has_demos) else "S0 = step.Map(fn=fn_gate).apply(E0)\nreturn S0\n"
            text = f"Here is the program.\n```python\n{body}```\nDone."
            comp = Completion(text=text, finish_reason="stop", completion_tokens=len(text) // 4)
            out.append(GenerationResult(request_id=r.request_id, prompt_tokens=100,
                                        completions=[comp.model_copy() for _ in range(r.sampling.n)]))
        return out

    def count_tokens(self, text):
        return len(text) // 4


class ScriptedPool:
    """Stands in for the Ray model pool the driver builds for `proposer.kind: llm`."""

    def __init__(self, backend, replicas=1, address=None):
        from stepforge.benchmark.schema import load_benchmark

        self.model = ScriptedBackend(load_benchmark())

    def generate(self, requests):
        return self.model.generate(requests)

    def count_prompts(self, requests):
        return [100 for _ in requests]  # what generate reports as each request's prompt tokens

    def context_length(self):
        return None  # no local tokenizer: nothing to pack

    def close(self):
        pass


def _llm_run(root: Path, knowledge: str) -> Path:
    """`stepforge improve` with the loop's own LLM proposer (`proposer.knowledge`) on the scripted pool."""
    from stepforge.loop.job import run_improve

    config = {
        "name": f"earned-{knowledge}", "tasks": EASY + [HARD], "variant": "agent+si",
        "proposer": {"kind": "llm", "style": "ir", "knowledge": knowledge,
                     "backend": {"kind": "openai", "model": "scripted", "base_url": "http://127.0.0.1:9/v1"}},
        "guardian": {"kind": "rule"}, "granularity": 1, "temperatures": [0.4], "n": 2, "max_rounds": 3,
        "verifier": {"kind": "inline", "seeds": [0]}, "progress": False,
    }
    path = root / f"{knowledge}.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("stepforge.serve.actors.ModelPool", ScriptedPool)
        mp.setattr("stepforge.serve.actors.init_ray", lambda *a, **k: None)
        run_improve(path, run_dir=root / f"run-{knowledge}")
    return root / f"run-{knowledge}"


@pytest.fixture(scope="module")
def earned_run(tmp_path_factory) -> Path:
    """A finished agent+si run: EASY solved in round 0, HARD in round 1 with demonstrations."""
    return _llm_run(tmp_path_factory.mktemp("earned"), "full")


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory) -> Path:
    """The same run with `proposer.knowledge: none` (the compact prompt)."""
    return _llm_run(tmp_path_factory.mktemp("compact"), "none")


def _buffer(run: Path) -> list[BufferEntry]:
    return [BufferEntry.model_validate_json(line) for line in (run / "buffer.jsonl").read_text().splitlines() if line]


def _irs(keys):
    from stepforge.benchmark.schema import load_benchmark

    tasks = load_benchmark()
    return {k: tasks[k] for k in keys}


def _expected_messages(entry: BufferEntry, buffer: dict[str, BufferEntry], knowledge=None):
    """What `proposer_messages` gives for this task and the demonstrations it was earned with."""
    from stepforge.loop.agents.knowledge import load_knowledge
    from stepforge.loop.agents.prompts import proposer_messages
    from stepforge.loop.interfaces import Demonstration

    irs = _irs(list(buffer))
    demos = [Demonstration(task_key=k, task=irs[k], impl=buffer[k].impl, success_rate=buffer[k].success_rate,
                           round=buffer[k].round) for k in entry.demonstrations]
    return proposer_messages(knowledge or load_knowledge(), demos, irs[entry.task_key], "ir")


def test_buffer_examples_carry_the_exact_prompt_and_the_earned_program(earned_run):
    from stepforge.loop.agents.replies import extract_program
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings

    entries = _buffer(earned_run)
    by_key = {e.task_key: e for e in entries}
    assert set(by_key) == set(EASY + [HARD])
    assert by_key[HARD].round == 1 and by_key[HARD].demonstrations == EASY  # earned with demonstrations
    ds = build_dataset(earned_run, DataSettings(), PromptSettings())
    assert [ex.task_key for ex in ds.examples] == [e.task_key for e in entries]
    for ex in ds.examples:
        entry = by_key[ex.task_key]
        assert ex.prompt == entry.messages  # the prompt the proposer saw, recorded by the loop
        assert ex.prompt == _expected_messages(entry, by_key)  # ... which is proposer_messages' output
        assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
        assert ex.impl == entry.impl
        parsed = extract_program(ex.answer)
        assert parsed is not None and parsed.program == entry.impl  # the answer parses back to the program
    hard = next(ex for ex in ds.examples if ex.task_key == HARD)
    assert by_key["moe-index/G_0_3_04"].impl.strip() in hard.prompt[-1]["content"]  # demonstration in the prompt


def test_rebuilt_prompts_equal_the_recorded_ones(earned_run, tmp_path):
    """Entries without a recorded prompt (e.g. from the search proposer) get exactly the loop's prompt."""
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings

    recorded = {e.task_key: e.messages for e in _buffer(earned_run)}
    stripped = tmp_path / "run"
    stripped.mkdir()
    (stripped / "buffer.jsonl").write_text("".join(
        e.model_copy(update={"messages": None}).model_dump_json() + "\n" for e in _buffer(earned_run)))
    ds = build_dataset(stripped, DataSettings(), PromptSettings())
    assert {ex.task_key: ex.prompt for ex in ds.examples} == recorded
    assert all(ex.meta["prompt"] == "rebuilt" for ex in ds.examples)
    rebuilt = build_dataset(earned_run, DataSettings(prompts="rebuild"), PromptSettings())
    assert {ex.task_key: ex.prompt for ex in rebuilt.examples} == recorded
    skipped = build_dataset(stripped, DataSettings(missing_prompt="skip"), PromptSettings())
    assert skipped.examples == [] and len(skipped.skipped) == 3


def test_compact_prompt_data_equals_the_loops_prompt(compact_run, earned_run):
    """SFT data with `knowledge: none` is exactly the prompt the loop sends for `proposer.knowledge: none`,
    whether the settings are inline or the improve config itself (`prompt.loop_config`)."""
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings

    recorded = {e.task_key: e.messages for e in _buffer(compact_run)}
    assert set(recorded) == set(EASY + [HARD])  # HARD earned with demonstrations, as in the full run
    full = {e.task_key: e.messages for e in _buffer(earned_run)}
    for key, messages in recorded.items():
        assert "# STeP reference" not in messages[0]["content"] and len(messages[0]["content"]) < 1000
        assert "# STeP reference" in full[key][0]["content"]
        assert messages[1] == full[key][1]  # only the system message differs
    config = compact_run.parent / "none.yaml"
    for prompt in (PromptSettings(knowledge="none"), PromptSettings(loop_config=str(config))):
        rebuilt = build_dataset(compact_run, DataSettings(prompts="rebuild"), prompt)
        assert {ex.task_key: ex.prompt for ex in rebuilt.examples} == recorded
        assert all(ex.meta["prompt"] == "rebuilt" for ex in rebuilt.examples)
    # the other knowledge gives other prompts (the settings are not ignored)
    other = build_dataset(compact_run, DataSettings(prompts="rebuild"), PromptSettings(knowledge="full"))
    assert {ex.task_key: ex.prompt for ex in other.examples} == full


def test_seeded_entries_make_no_examples_but_still_demonstrate(earned_run, tmp_path):
    """Entries a run was seeded with (`seed_buffer`, `source` set) are not its experience."""
    from stepforge.training.data import build_dataset, load_buffer
    from stepforge.training.settings import DataSettings, PromptSettings

    entries = _buffer(earned_run)
    recorded = {e.task_key: e.messages for e in entries}
    seeded_run = tmp_path / "run"
    seeded_run.mkdir()
    (seeded_run / "buffer.jsonl").write_text("".join(
        e.model_copy(update={"source": "elsewhere/buffer.jsonl"} if e.task_key == EASY[0] else {}).model_dump_json()
        + "\n" for e in entries))
    assert [e.task_key for e in load_buffer(seeded_run, seeded=False)] == [k for k in recorded if k != EASY[0]]
    assert len(load_buffer(seeded_run)) == 3
    ds = build_dataset(seeded_run, DataSettings(prompts="rebuild"), PromptSettings())
    assert {ex.task_key: ex.prompt for ex in ds.examples} == {k: v for k, v in recorded.items() if k != EASY[0]}
    assert any(s.startswith(f"{EASY[0]} (seeded from elsewhere") for s in ds.skipped)


def test_filters_extra_tasks_and_compact_prompt(earned_run):
    from stepforge.loop.agents.knowledge import CompactKnowledge, load_knowledge
    from stepforge.loop.agents.prompts import proposer_messages
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings

    ds = build_dataset(earned_run, DataSettings(max_success_rate=0.99, extra_tasks=["gemm/G_0_6_02", HARD], repeat=2),
                       PromptSettings())
    # every entry was solved by all its samples (rate 1.0): all filtered out; HARD comes back as an extra task
    assert sorted({ex.task_key for ex in ds.examples}) == sorted(["gemm/G_0_6_02", HARD])
    assert len(ds.examples) == 4 and {ex.source for ex in ds.examples} == {"extra"}
    from stepforge.benchmark.schema import load_benchmark

    tasks = load_benchmark()
    for ex in ds.examples:
        assert ex.prompt == proposer_messages(load_knowledge(), [], _irs([ex.task_key])[ex.task_key], "ir")
        assert ex.impl == tasks[ex.task_key].impl
    compact = build_dataset(None, DataSettings(extra_tasks=["gemm/G_0_6_02"]), PromptSettings(knowledge="none"))
    (ex,) = compact.examples
    assert ex.prompt == proposer_messages(CompactKnowledge(), [], _irs(["gemm/G_0_6_02"])["gemm/G_0_6_02"], "ir")
    assert "# STeP reference" not in ex.prompt[0]["content"] and len(ex.prompt[0]["content"]) < 1000
    only = build_dataset(earned_run, DataSettings(), PromptSettings(), only_tasks=[HARD])
    assert [e.task_key for e in only.examples] == [HARD]


def test_collated_labels_mask_the_prompt(tiny_model_dir, tmp_path):
    """Every prompt token's label is -100; the answer tokens (and the end-of-turn) keep their ids."""
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings, load_sft_settings
    from stepforge.training.sft import build_trainer

    ds = build_dataset(None, DataSettings(extra_tasks=["moe-index/G_0_3_04", "rope/G_0_3_02"]),
                       PromptSettings(knowledge="none"))
    settings = load_sft_settings(Path(__file__).resolve().parents[2] / "configs" / "sft_tiny.yaml", ["max_steps=1"])
    trainer = build_trainer(ds.examples, tiny_model_dir, tmp_path / "out", settings)
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert batch["input_ids"].shape == batch["labels"].shape
    for row, ex in enumerate(ds.examples):
        prompt_ids = tok.apply_chat_template(ex.prompt, tokenize=True, add_generation_prompt=True)
        prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
        full_ids = tok.apply_chat_template(list(ex.messages), tokenize=True)
        full_ids = list(full_ids["input_ids"] if hasattr(full_ids, "keys") else full_ids)
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row].tolist()
        n_prompt, n_full = len(prompt_ids), len(full_ids)
        assert ids[:n_full] == full_ids and ids[:n_prompt] == prompt_ids
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n_full] == full_ids[n_prompt:]
        assert all(x == -100 for x in labels[n_full:])  # padding
        answer = tok.decode(full_ids[n_prompt:])
        assert answer.startswith(ex.answer) and "<|im_end|>" in answer


def test_settings_errors_name_the_file_and_key(tmp_path):
    from stepforge.training.settings import TrainingConfigError, load_sft_settings

    path = tmp_path / "sft.yaml"
    path.write_text("lora: {r: 0, alphaa: 3}\nlearning_rate: -1\n")
    with pytest.raises(TrainingConfigError) as err:
        load_sft_settings(path)
    text = str(err.value)
    assert f"{path}: lora.r: expected a number >= 1, got 0" in text
    assert "unknown key 'alphaa'; expected one of: r, alpha" in text
    assert f"{path}: learning_rate: " in text
    s = load_sft_settings(None, ["lora.target_modules=all-linear", "data.extra_tasks=gemm/*", "max_steps=3"])
    assert s.lora.target_modules == "all-linear" and s.data.extra_tasks == ["gemm/*"] and s.max_steps == 3
    with pytest.raises(TrainingConfigError, match=r"max_steps \(from --set\)"):
        load_sft_settings(None, ["max_steps=abc"])
    with pytest.raises(TrainingConfigError, match=r"prompt.knowledge \(from --set\): .*'full' or 'none'"):
        load_sft_settings(None, ["prompt.knowledge=some"])
    with pytest.raises(TrainingConfigError, match=r"prompt.options \(from --set\): replaced by prompt.knowledge"):
        load_sft_settings(None, ["prompt.options.knowledge=none"])


def test_examples_longer_than_the_context_are_refused(tiny_model_dir):
    from stepforge.training.data import build_dataset
    from stepforge.training.settings import DataSettings, PromptSettings
    from stepforge.training.sft import TrainingError, check_lengths, load_tokenizer, model_context

    ds = build_dataset(None, DataSettings(extra_tasks=["gemm/G_0_6_02"]), PromptSettings())
    tok = load_tokenizer(tiny_model_dir)
    context = model_context(tiny_model_dir)
    assert context is not None and context > 1000
    ((n_prompt, n_full),) = check_lengths(tok, ds.examples, max_length=100_000, context=context)
    assert 0 < n_prompt < n_full
    with pytest.raises(TrainingError, match=f"longer than the model's context of {n_full - 1} tokens"):
        check_lengths(tok, ds.examples, max_length=100_000, context=n_full - 1)
    with pytest.raises(TrainingError, match=f"longer than max_length={n_full - 1} tokens"):
        check_lengths(tok, ds.examples, max_length=n_full - 1, context=context)


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([STEPFORGE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_cli_errors_are_one_line_exit_2(tiny_model_dir, tmp_path, earned_run):
    cases = [
        (["train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "nope")],
         "no such run directory"),
        (["train", "sft", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "a"), "--extra-tasks", "gemm/*"],
         "not a model directory"),
        (["train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--extra-tasks", "nosuch/task"],
         "matches no task"),
        (["train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--run-dir", str(earned_run)],
         "longer than max_length=4096 tokens"),  # full knowledge prompts (~7k tokens) with the default max_length
        (["train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--extra-tasks", "gemm/*",
          "--set", "lora.rank=3"], "unknown key 'rank'"),
        (["ablate", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
    ]
    for args, message in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    dry = _cli("train", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "dry"), "--run-dir",
               str(earned_run), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = (tmp_path / "dry" / "dataset.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["messages"][-1]["role"] == "assistant" for x in lines)


def test_open_mode_entries_answer_with_the_candidate_and_rebuild_open_prompts():
    from stepforge.benchmark.open_mode import reference_candidate
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.agents.replies import extract_candidate_with_reason
    from stepforge.loop.interfaces import BufferEntry
    from stepforge.training.data import PromptBuilder, buffer_examples
    from stepforge.training.settings import DataSettings

    task = load_benchmark()["gemm/G_0_6_02"]
    cand = reference_candidate(task).to_yaml()
    entry = BufferEntry(task_key=task.key, impl=cand, success_count=1, n_samples=2, success_rate=0.5, round=0,
                        temperature=0.4, mode="open")
    (example,), skipped = buffer_examples([entry], DataSettings(prompts="rebuild"), PromptBuilder())
    assert not skipped and example.meta["mode"] == "open"
    assert example.answer.startswith("```yaml\n") and extract_candidate_with_reason(example.answer)[0] == cand
    user = example.prompt[-1]["content"]
    assert "Write the fns and the impl of the open task" in user and "fns:" not in user.rsplit("Task:", 1)[1]
