"""Every benchmark task: its reference solution passes the verifier at every binding, and obeys the affine rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import added_task_keys

from stepforge import simulator as sim
from stepforge.benchmark.schema import load_benchmark
from stepforge.benchmark.verifier import verify

TASKS = load_benchmark()
SEEDS = (0, 1, 2, 3)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmark.md"

# docs/benchmark.md: fns and Copies of the non-MoE tasks (and the approximate length of the reference).
TABLE = {
    "attention/G_0_4_01": (2, 0, 4),
    "attention/G_0_6_01": (4, 0, 6),
    "attention/G_0_9_01": (5, 1, 9),
    "bmm/bmm_0": (2, 0, 6),
    "bmm/bmm_1": (2, 0, 8),
    "bmm/bmm_2": (2, 0, 9),
    "gemm/G_0_7_01": (2, 0, 7),
    "gemm/G_0_6_03": (2, 0, 6),
    "gemm/G_0_6_02": (2, 0, 6),
    "norm/G_0_9_02": (6, 1, 9),
    "norm/G_0_16_01": (7, 3, 16),
    "norm/G_0_8_01": (6, 1, 8),
    "rope/G_0_3_02": (2, 0, 3),
    "rope/G_0_3_03": (2, 0, 3),
    "rope/G_0_4_01": (2, 1, 4),
}


@pytest.mark.parametrize("key", list(TASKS))
def test_reference_passes_at_every_declared_binding(key):
    task = TASKS[key]
    assert task.impl, "a benchmark task carries its reference solution"
    assert task.bindings, "a task declares at least one non-default binding"
    verdict = verify(task, seeds=SEEDS)
    assert verdict.passed, verdict.message
    assert verdict.stage == "ok" and verdict.affine_ok and verdict.functional_ok
    assert verdict.runs == (1 + len(task.bindings)) * len(SEEDS)


@pytest.mark.parametrize("key", list(TASKS))
def test_reference_obeys_the_affine_rule_and_returns_the_declared_types(key):
    task = TASKS[key]
    program = sim.parse_program(task.impl)
    assert sim.check_affine(program) == []
    assert isinstance(program.statements[-1], sim.program.Return)
    assert len(program.returns.names) == len(task.outputs)


@pytest.mark.parametrize("key", list(TASKS))
def test_naive_engine_agrees_at_the_defaults(key):
    verdict = verify(TASKS[key], seeds=(0,), bindings=[{}], engine="naive")
    assert verdict.passed, verdict.message


@pytest.mark.parametrize("key", list(TABLE))
def test_non_moe_task_matches_the_benchmark_table(key):
    task = TASKS[key]
    n_fns, n_copies, lines = TABLE[key]
    assert len(task.fns) == n_fns
    program = sim.parse_program(task.impl)
    copies = sum(1 for st in program.statements if isinstance(st, sim.program.Apply) and st.call.op == "Copy")
    assert copies == n_copies
    assert abs(task.reference_lines() - lines) <= 1


def test_rope_bindings_keep_d_even_and_every_binding_is_distinct_from_the_defaults():
    for key, task in TASKS.items():
        for b in task.bindings:
            assert b, key
            assert any(b.get(k) != v for k, v in {"M": 5, "N": 7, "K": 9, "D": 16}.items()), key
        if task.group == "rope":
            assert all(b.get("D", 16) % 2 == 0 for b in task.bindings), key


def _copies(task) -> int:
    program = sim.parse_program(task.impl)
    return sum(1 for st in program.statements if isinstance(st, sim.program.Apply) and st.call.op == "Copy")


def _added_table() -> dict[str, tuple[int, int, int, bool]]:
    """docs/benchmark.md's table of added tasks: key -> (fns, lines, copies, routes)."""
    rows = re.findall(r"^\| `([\w-]+/[\w.-]+)` \| (\d+) \| (\d+) \| (\d+) \| ?(route)? ?\|", DOCS.read_text(), re.M)
    return {key: (int(f), int(lines), int(c), bool(route)) for key, f, lines, c, route in rows}


def test_the_added_tasks_table_of_benchmark_md_matches_the_task_files():
    table = _added_table()
    added = added_task_keys(TASKS)
    assert sorted(table) == sorted(added)
    for key in added:
        task = TASKS[key]
        routes = "step.Partition(" in task.impl and "step.Merge(" in task.impl
        assert table[key] == (len(task.fns), task.reference_lines(), _copies(task), routes), key


def test_added_tasks_are_described_and_enough_of_them_route_or_copy_twice():
    added = added_task_keys(TASKS)
    for key in added:
        task = TASKS[key]
        assert task.description and len(task.bindings) >= 2, key
    hard = [key for key in added if _added_table()[key][3] or _copies(TASKS[key]) >= 2]
    assert len(hard) >= 10, hard
