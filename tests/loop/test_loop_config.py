"""Experiment configs: the shipped files, overrides, and errors that name file, key and expectation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepforge.cli import app
from stepforge.loop.config import (
    ConfigError,
    ImproveConfig,
    apply_overrides,
    check_resume_overrides,
    load_config,
    parse_override,
    resolve_model_paths,
    select_tasks,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KEYS = ["attention/G_0_4_01", "attention/G_0_6_01", "bmm/bmm_0", "rope/G_0_4_01", "rope/G_0_3_02"]


IMPROVE_CONFIGS = ["default.yaml", "cpu_smoke.yaml", "openai_compatible.yaml", "qwen2.5-coder-7b_vllm.yaml",
                   "qwen2.5-coder-7b_vllm_single.yaml", "qwen2.5-coder-7b_vllm_agent.yaml",
                   "qwen2.5-coder-7b_vllm_ir-ablation.yaml"]


@pytest.mark.parametrize("name", IMPROVE_CONFIGS)
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.n >= 1 and cfg.temperatures


def test_default_and_smoke_configs():
    default = load_config(CONFIGS / "default.yaml")
    assert (default.variant, default.proposer.resolved_kind, default.guardian.kind) == ("agent+si", "search", "rule")
    from support import PUBLISHED_GROUPS

    from stepforge.benchmark.schema import load_benchmark

    tasks = load_benchmark()
    published = [k for k, t in tasks.items() if t.group in PUBLISHED_GROUPS]
    assert select_tasks(default.tasks, list(tasks)) == published and len(published) == 26  # the main job
    # the demo's budget: one search per task and step in the prior's order, stopped at the first correct program
    assert (default.granularity, default.temperatures, default.stop_when_solved) == (3, [0.0], True)
    assert default.proposer.options["candidate_schedule"] == [400, 40]
    assert not default.uses_ray()
    smoke = load_config(CONFIGS / "cpu_smoke.yaml")
    assert smoke.proposer.resolved_kind == "llm" and smoke.proposer.backend.kind == "hf"
    assert len(smoke.tasks) == 3 and smoke.max_rounds == 2 and smoke.uses_ray()
    gpu = load_config(CONFIGS / "qwen2.5-coder-7b_vllm.yaml", ["proposer.backend.model=/w/q7", "variant=single"])
    assert gpu.proposer.backend.model == "/w/q7" and gpu.proposer.backend.kind == "vllm"
    assert gpu.effective().guardian.kind == "none" and gpu.rounds_limit == 1


def test_variants_and_defaults():
    cfg = ImproveConfig()
    assert cfg.proposer.resolved_kind == "search" and cfg.adaptive and cfg.rounds_limit == 10
    abl = ImproveConfig(variant="ir-ablation").effective()
    assert abl.proposer.style == "python" and abl.adaptive
    agent = ImproveConfig(variant="agent")
    assert agent.rounds_limit == 1 and agent.effective().guardian.kind == "rule"


def test_overrides_parse_values_and_create_sections():
    assert parse_override("n=3") == (["n"], 3)
    assert parse_override("temperatures=[0.2, 0.9]") == (["temperatures"], [0.2, 0.9])
    assert parse_override("proposer.backend.model=/a/b") == (["proposer", "backend", "model"], "/a/b")
    data, keys = apply_overrides({"proposer": {"backend": None}}, ["proposer.backend.model=/m", "proposer.backend.kind=hf"])
    assert data == {"proposer": {"backend": {"model": "/m", "kind": "hf"}}} and keys == {"proposer.backend.model",
                                                                                        "proposer.backend.kind"}
    cfg = load_config(CONFIGS / "default.yaml", ["proposer.backend.model=m", "proposer.backend.kind=openai",
                                                 "proposer.backend.base_url=http://x/v1"])
    assert cfg.proposer.resolved_kind == "llm"
    for bad in ("n", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def _error(tmp_path, text, overrides=()):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_errors_name_file_key_and_expectation(tmp_path):
    msg = _error(tmp_path, "n: 0\n")
    assert msg == f"{tmp_path / 'bad.yaml'}: n: expected a number >= 1, got 0"
    msg = _error(tmp_path, "proposer:\n  kindd: llm\n")
    assert "proposer.kindd: unknown key 'kindd'; expected one of: kind, style" in msg
    msg = _error(tmp_path, "proposer:\n  backend: {kind: hf, modle: /x}\n")
    assert "proposer.backend.modle: unknown key" in msg and "model" in msg
    msg = _error(tmp_path, "variant: best\n")
    assert "variant: expected 'single', 'agent', 'agent+si' or 'ir-ablation', got 'best'" in msg
    msg = _error(tmp_path, "temperatures: [0.4, 0.4]\n")
    assert "temperatures: expected distinct temperatures" in msg
    msg = _error(tmp_path, "tasks: [a\n")
    assert "bad.yaml: line" in msg and "not valid YAML" in msg
    msg = _error(tmp_path, "- a\n- b\n")
    assert "(top level): expected a mapping" in msg
    msg = _error(tmp_path, "n: 2\n", ["verifier.workers=0"])
    assert "verifier.workers (from --set):" in msg
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_task_selection():
    assert select_tasks(["*"], KEYS) == KEYS
    assert select_tasks(["rope/*", "bmm/bmm_0"], KEYS) == ["bmm/bmm_0", "rope/G_0_4_01", "rope/G_0_3_02"]
    assert select_tasks(["bmm_0"], KEYS) == ["bmm/bmm_0"]
    with pytest.raises(ConfigError, match=r"tasks\[0\]: 'G_0_4_01' names 2 tasks"):
        select_tasks(["G_0_4_01"], KEYS, "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: tasks\[1\]: 'gemm/\*' matches no task"):
        select_tasks(["bmm/*", "gemm/*"], KEYS, "c.yaml")


def test_resume_may_change_only_operational_keys():
    check_resume_overrides(["ray.num_cpus=4", "verifier.workers=3", "proposer.backend.model=/new/path"])
    with pytest.raises(ConfigError, match="a resumed run keeps its config"):
        check_resume_overrides(["n=8"])


def test_relative_model_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_model_paths(ImproveConfig(proposer={"backend": {"kind": "hf", "model": "m/tiny"}}))
    assert cfg.proposer.backend.model == str(tmp_path / "m" / "tiny")


def test_relative_seed_buffer_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ImproveConfig().seed_buffer is None
    cfg = resolve_model_paths(load_config(None, ["seed_buffer=runs/src"]))
    assert cfg.seed_buffer == str(tmp_path / "runs" / "src")
    with pytest.raises(ConfigError, match="a resumed run keeps its config"):
        check_resume_overrides(["seed_buffer=/elsewhere"])


def test_knowledge_option_reaches_the_llm_proposer(monkeypatch):
    """`proposer.knowledge` is validated and the driver builds the LLM proposer with that knowledge."""
    from stepforge.loop.agents.knowledge import CompactKnowledge, load_knowledge
    from stepforge.loop.config import ProposerConfig
    from stepforge.loop.interfaces import ProposalRequest
    from stepforge.loop.job import build_components

    assert ProposerConfig().knowledge == "full"
    with pytest.raises(ConfigError, match=r"config: proposer.knowledge \(from --set\): expected 'full' or 'none'"):
        load_config(None, ["proposer.knowledge=some"])

    class FakePool:
        def __init__(self, backend, replicas=1, address=None):
            self.backend = backend

        def close(self):
            pass

    monkeypatch.setattr("stepforge.serve.actors.ModelPool", FakePool)
    monkeypatch.setattr("stepforge.serve.actors.init_ray", lambda *a, **k: None)
    base = ["proposer.kind=llm", "proposer.backend.kind=openai", "proposer.backend.model=m",
            "proposer.backend.base_url=http://127.0.0.1:9/v1", "verifier.kind=inline"]
    from stepforge.benchmark.schema import load_benchmark

    task = load_benchmark()["bmm/bmm_0"]
    request = ProposalRequest(task_key="bmm/bmm_0", task=task)
    systems = {}
    for variant in ("full", "none"):
        cfg = load_config(None, base + [f"proposer.knowledge={variant}"])
        with contextlib.ExitStack() as stack:
            proposer = build_components(cfg, {"bmm/bmm_0": task}, stack).proposer
            assert proposer.knowledge == load_knowledge(variant=variant)
            systems[variant] = proposer.messages_for(request)[0]["content"]
    assert isinstance(load_knowledge(variant="none"), CompactKnowledge)
    assert "### Map" in systems["full"] and "### Map" not in systems["none"]
    assert 10 * len(systems["none"]) < len(systems["full"])


def test_model_paths_are_checked_for_every_kind_that_uses_a_backend(tmp_path):
    from stepforge.loop.config import check_model_paths

    missing = {"kind": "hf", "model": str(tmp_path / "no-model")}
    for kind, extra in (("llm", {}), ("custom", {"factory": "pkg.mod:fn"}), (None, {})):
        cfg = ImproveConfig(proposer={"kind": kind, "backend": missing, **extra})
        with pytest.raises(ConfigError, match="proposer.backend.model: expected a local model directory"):
            check_model_paths(cfg)
    check_model_paths(ImproveConfig(proposer={"kind": "search", "backend": missing}))  # search never uses it
    (tmp_path / "no-model").mkdir()
    check_model_paths(ImproveConfig(proposer={"kind": "custom", "factory": "pkg.mod:fn", "backend": missing}))


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: -1\n")
    res = runner.invoke(app, ["improve", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "error: " in res.output and "bad.yaml: n:" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["improve", "--config", str(CONFIGS / "default.yaml"), "--set", "tasks=[nope/*]",
                              "--run-dir", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "matches no task" in res.output
    assert not (tmp_path / "run2").exists()  # nothing created for a bad config
    res = runner.invoke(app, ["improve", "--config", str(CONFIGS / "qwen2.5-coder-7b_vllm.yaml"),
                              "--run-dir", str(tmp_path / "run3")])
    assert res.exit_code == 2 and "proposer.backend.model: expected a local model directory" in res.output
    res = runner.invoke(app, ["improve", "--config", str(CONFIGS / "default.yaml"), "--set", "proposer.options.nope=1",
                              "--run-dir", str(tmp_path / "run4")])
    assert res.exit_code == 2 and "default.yaml: proposer.options.nope: unknown key 'nope'" in res.output
    assert not (tmp_path / "run4").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    res = runner.invoke(app, ["improve", "--config", str(CONFIGS / "default.yaml"), "--run-dir", str(tmp_path / "used")])
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    res = runner.invoke(app, ["improve", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no such run directory" in res.output
    res = runner.invoke(app, ["improve"])
    assert res.exit_code == 2 and "--config" in res.output
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output


@pytest.mark.parametrize(("override", "message"), [
    ("temperatures=[0.005]", "neither greedy"),
    ("temperatures=[-1]", "finite number >= 0"),
    ("guardian.temperature=3", "at most 2"),
])
def test_temperatures_every_backend_samples_alike_or_a_config_error(override, message):
    """vLLM quietly raises temperatures in (0, 0.01) to 0.01: such a config fails before any engine starts."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    assert load_config(None, ["temperatures=[0, 0.01, 2.0]"]).temperatures == [0, 0.01, 2.0]
