"""The run directory: atomic appends, torn last lines, locking, atomic state."""

from __future__ import annotations

import json

import pytest

from stepforge.benchmark.verdict import Verdict
from stepforge.loop.runstore import (
    SAMPLES,
    RunStore,
    RunStoreError,
    SampleRecord,
    append_lines,
    load_jsonl,
)


def _sample(i: int) -> SampleRecord:
    return SampleRecord(round=0, step=0, task="t", temperature=0.4, index=i, of=3, seed=1, raw=f"r{i}",
                        verdict=Verdict(passed=False, stage="value"))


def test_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    path = tmp_path / "x.jsonl"
    append_lines(path, [json.dumps({"a": 1}), json.dumps({"a": 2})])
    with open(path, "ab") as fh:
        fh.write(b'{"a": 3, "b": "half')  # a kill in the middle of a write
    assert load_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert load_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    append_lines(path, [json.dumps({"a": 4})])
    assert load_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    # valid JSON cut just before its newline is also a torn write
    with open(path, "ab") as fh:
        fh.write(b'{"a": 5}')
    assert load_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert path.read_bytes().endswith(b'{"a": 4}\n')


def test_a_bad_line_in_the_middle_is_corruption(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(RunStoreError, match=r"x.jsonl: line 2: not a JSON record"):
        load_jsonl(path)
    path.write_text('{"a": 1}\nnot json\n')  # a bad final line: dropped
    assert load_jsonl(path) == [{"a": 1}]


def test_samples_round_trip_and_resume_drops_torn_tail(tmp_path):
    store = RunStore.create(tmp_path / "run", "name: t\n")
    store.append_samples([_sample(0), _sample(1)])
    with open(store.path(SAMPLES), "ab") as fh:
        fh.write(_sample(2).model_dump_json()[:40].encode())
    store.close()
    again = RunStore.open(tmp_path / "run")
    samples, steps = again.prepare_resume()
    assert sorted(samples) == ["r0/s0/t/t0.4/i0", "r0/s0/t/t0.4/i1"] and steps == []
    again.append_samples([_sample(2)])
    assert len(again.load_samples()) == 3
    again.close()


def test_create_refuses_a_used_directory_and_the_lock_excludes_a_second_process(tmp_path):
    store = RunStore.create(tmp_path / "run", "name: t\n")
    with pytest.raises(RunStoreError, match="not empty; use --resume"):
        RunStore.create(tmp_path / "run", "name: t\n")
    with pytest.raises(RunStoreError, match="another stepforge process"):
        RunStore.open(tmp_path / "run")
    store.close()
    RunStore.open(tmp_path / "run").close()
    with pytest.raises(RunStoreError, match="not a run directory"):
        RunStore.open(tmp_path)


def test_state_and_buffer_are_replaced_atomically(tmp_path):
    store = RunStore.create(tmp_path / "run", "name: t\n")
    store.write_state({"round": 1})
    store.write_state({"round": 2})
    assert store.load_state()["round"] == 2
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "config.yaml", "state.json"]
    store.close()
