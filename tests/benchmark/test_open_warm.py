"""Open mode through the warm verifier, the process pool and the CLI, with closed mode's caches."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from stepforge.benchmark import verifier
from stepforge.benchmark.cli import register
from stepforge.benchmark.open_mode import fn_builder, reference_candidate, verify_open
from stepforge.benchmark.pool import VerifierPool
from stepforge.benchmark.schema import load_benchmark
from stepforge.benchmark.warm import WarmVerifier

TASKS = load_benchmark()
KEYS = ["norm/G_0_8_01", "attention/G_0_4_01", "moe-index/G_0_3_03", "rope/G_0_3_02"]
runner = CliRunner()


def wrong_op(task):
    """norm/G_0_8_01's reference candidate with `fn_square` cubing: the same type, wrong values."""
    cand = reference_candidate(task)
    fns = [f.model_copy(update={"apply": "return [input[0] * input[0] * input[0]]\n"}) if f.func_name == "fn_square"
           else f for f in cand.fns]
    return cand.model_copy(update={"fns": fns})


def summary(v):
    return v.passed, v.stage, v.message, v.runs, v.binding, v.seed


def test_open_candidates_verify_in_the_pool_as_in_process():
    jobs = [(k, reference_candidate(TASKS[k])) for k in KEYS] + [("norm/G_0_8_01", wrong_op(TASKS["norm/G_0_8_01"]))]
    with VerifierPool(workers=2, timeout_s=60.0) as pool:
        got = pool.verify_many(jobs + [("norm/G_0_8_01", None)], seeds=(0, 1))
    want = [verify_open(TASKS[k], c, seeds=(0, 1)) for k, c in jobs]
    assert [summary(v) for v in got[:-1]] == [summary(v) for v in want]
    assert all(v.passed for v in got[:len(KEYS)]) and got[-1].passed  # a closed job in the same batch
    assert got[len(KEYS)].stage == "value"


def test_open_mode_uses_the_closed_caches_and_builds_fns_once_per_binding():
    verifier.clear_caches()
    warm = WarmVerifier(verify_kwargs={"seeds": (0, 1, 2)})
    task = warm.task("moe-index/G_0_3_03")
    assert warm.verify(task.key).passed  # closed: fills the task's entry (inputs, oracles per binding and seed)
    before = warm.stats()
    candidate = reference_candidate(task)
    builds = []
    build = fn_builder(task, candidate)

    def counting(namespace):
        builds.append(dict(namespace["ctx"]))
        return build(namespace)

    verdict = verifier.verify(task, candidate.impl, seeds=(0, 1, 2), fns=counting)
    n_bindings = len(verifier.resolve_bindings(task))
    assert verdict.passed and verdict.runs == 3 * n_bindings
    assert len(builds) == n_bindings  # once per binding, not per (binding, seed)
    counting.key = build.key  # a keyed builder's fns are kept in the task's cache entry, per binding
    for _ in range(2):
        assert verifier.verify(task, candidate.impl, seeds=(0, 1, 2), fns=counting).passed
    assert len(builds) == 2 * n_bindings
    other = fn_builder(task, wrong_op(TASKS["norm/G_0_8_01"]))
    assert other.key != build.key and fn_builder(task, reference_candidate(task)).key == build.key
    assert warm.verify(task.key, candidate).passed
    after = warm.stats()
    assert (after["misses"], after["entries"], after["bytes"]) == (before["misses"], before["entries"], before["bytes"])
    assert after["hits"] > before["hits"]


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def test_cli_verify_open(app, tmp_path):
    ok = runner.invoke(app, ["verify", "norm/G_0_8_01", "--open", "--json", "--seeds", "1"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["passed"]
    path = tmp_path / "cand.yaml"
    path.write_text(wrong_op(TASKS["norm/G_0_8_01"]).to_yaml())
    bad = runner.invoke(app, ["verify", "norm/G_0_8_01", "--open", "--impl", str(path), "--json", "--seeds", "1"])
    assert bad.exit_code == 1 and json.loads(bad.output)["stage"] == "value"
    path.write_text("fns: [\n")
    broken = runner.invoke(app, ["verify", "norm/G_0_8_01", "--open", "--impl", str(path)])
    assert broken.exit_code == 1 and "FAIL fns" in broken.output and "not valid YAML" in broken.output
    path.write_text(reference_candidate(TASKS["norm/G_0_8_01"]).to_yaml().replace("torch.", "__import__('os')."))
    evil = runner.invoke(app, ["verify", "norm/G_0_8_01", "--open", "--impl", str(path), "--json"])
    assert evil.exit_code == 1 and json.loads(evil.output)["stage"] == "fns"


def test_cli_tasks_open_and_a_closed_task(app, tmp_path):
    listed = runner.invoke(app, ["tasks", "--open", "--json"])
    assert listed.exit_code == 0
    assert [json.loads(line)["key"] for line in listed.output.splitlines()] == [k for k, t in TASKS.items() if t.open]
    closed = TASKS["norm/G_0_8_01"].model_copy(update={"open": False})
    path = tmp_path / "G_0_8_01.yaml"
    path.write_text(closed.to_yaml())
    refused = runner.invoke(app, ["verify", str(path), "--open"])
    assert refused.exit_code == 2 and "open: false" in refused.output
