"""Algorithm 1's control flow with a scripted proposer (no model, no simulator).

The proposer's replies are chosen per (task, demonstrations shown,
temperature); a reply starting with `ok` is correct. The tests pin the exact
sequence of (round, step, demonstration keys, tasks sampled), when tasks
leave the unsolved set, when the loop stops, and how the temperatures merge.
"""

from __future__ import annotations

import threading
import time

import pytest
from support import make_task
from test_loop_scripted import ScriptedProposer, ok_verify

from stepforge.benchmark.verdict import Verdict
from stepforge.loop.algorithm import LoopSettings, StepPlan, run_algorithm1
from stepforge.loop.buffer import demonstration_sets, stratify
from stepforge.loop.executor import Executor, SampleJob, derive_seed
from stepforge.loop.interfaces import BufferEntry, Proposal, Proposer
from stepforge.loop.verifiers import InlineVerifier

TASKS = {k: make_task(k) for k in "ABCDEFG"}
T2 = (0.4, 1.0)


def run(script, settings, tasks=TASKS, verify=ok_verify, guardian=None):
    proposer = ScriptedProposer(script)
    result = run_algorithm1(tasks, proposer, guardian, verify, settings, extract=lambda raw: raw, chunk_size=3)
    return result, proposer


def plans(result):
    return [(p.round, p.step, p.demonstrations, "".join(p.tasks)) for p in result.plans]


def entry(result, key):
    return next(e for e in result.buffer if e.task_key == key)


# round 0: A easy (4/4), B hard (1/4), C only at temperature 1.0 (2/4); D solved in round 1 once it sees B and C
SCRIPT = {
    ("A", (), 0.4): ["ok", "ok"], ("A", (), 1.0): ["ok", "ok"],
    ("B", (), 0.4): ["ok", "no"], ("B", (), 1.0): ["no", "no"],
    ("C", (), 0.4): ["no", "no"], ("C", (), 1.0): ["ok_long_program", "ok"],
    ("D", ("B", "C"), 0.4): ["no", "ok"],
}


def test_exact_sequence_of_rounds_steps_and_demonstrations():
    result, proposer = run(SCRIPT, LoopSettings(granularity=3, temperatures=T2, n=2))
    assert plans(result) == [
        (0, 0, (), "ABCDEFG"),          # round 0: base knowledge only
        (1, 0, ("B",), "DEFG"),         # D = {B .25, C .5, A 1}: hardest group first
        (1, 1, ("B", "C"), "DEFG"),     # cumulative; D solved -> break, restratify
        (2, 0, ("B", "D"), "EFG"),      # D earned at .25 in round 1: ties by round, groups [B, D], [C], [A]
        (2, 1, ("B", "D", "C"), "EFG"),
        (2, 2, ("B", "D", "C", "A"), "EFG"),  # d == D and nothing new: stop
    ]
    assert result.stop_reason == "a full pass over the demonstration groups solved nothing new"
    assert result.unsolved == ["E", "F", "G"]
    assert result.rounds == 3
    assert [e.task_key for e in result.buffer] == ["A", "B", "C", "D"]
    d = entry(result, "D")
    assert (d.round, d.step, d.demonstrations, d.success_rate, d.success_count, d.n_samples) == \
        (1, 1, ["B", "C"], 0.25, 1, 4)
    # every unsolved task is asked at every temperature for n samples, with the plan's demonstrations in order
    seen = [(r.task_key, tuple(x.task_key for x in r.demonstrations), r.temperature, r.n) for r in proposer.requests]
    assert seen[:14] == [(t, (), temp, 2) for t in "ABCDEFG" for temp in T2]
    assert seen[14:22] == [(t, ("B",), temp, 2) for t in "DEFG" for temp in T2]
    # a demonstration carries the task's IR and the earned program
    demo = next(r for r in proposer.requests if r.demonstrations).demonstrations[0]
    assert (demo.task_key, demo.task, demo.impl, demo.success_rate) == ("B", TASKS["B"], "ok", 0.25)


def test_temperature_sweep_keeps_best_per_task():
    result, _ = run(SCRIPT, LoopSettings(granularity=3, temperatures=T2, n=2))
    c = entry(result, "C")
    # solved only at 1.0; the rate counts every sample of the step (both temperatures)
    assert (c.temperature, c.success_count, c.n_samples, c.success_rate) == (1.0, 2, 4, 0.5)
    assert c.impl == "ok"  # the shortest correct program across temperatures
    a = entry(result, "A")
    assert (a.success_rate, a.temperature) == (1.0, 0.4)
    step0 = result.steps[0]
    assert step0.solved == ["A", "B", "C"]
    assert len(step0.records) == 7 * 2 * 2


def test_shortest_after_dedup_across_temperatures():
    long_ok = "a = step.Map(fn=f).apply(E0)\nb = step.Map(fn=f).apply(a)\nreturn b\n"
    short_ok = "x = step.Map(fn=f).apply(E0)\nreturn x\n"
    same_as_short = "# a comment\ny = step.Map(fn=f).apply(E0)\nreturn y\n"
    script = {("A", (), 0.4): [long_ok, same_as_short], ("A", (), 1.0): [short_ok, "no"]}

    def verify(task, program):
        good = "Map" in program
        return Verdict(passed=good, stage="ok" if good else "value", message="", affine_ok=True,
                               functional_ok=good)

    result, _ = run(script, LoopSettings(granularity=3, temperatures=T2, n=2), tasks={"A": make_task("A")}, verify=verify)
    a = entry(result, "A")
    # `same_as_short` and `short_ok` are isomorphic; the first of the class (temperature 0.4) is kept
    assert a.impl == same_as_short and a.temperature == 0.4
    assert (a.success_count, a.n_samples) == (3, 4)
    assert result.plans == [StepPlan(0, 0, (), ("A",))]
    assert result.stop_reason == "all tasks solved"


def test_empty_buffer_resamples_once_with_base_knowledge_then_stops():
    result, _ = run({}, LoopSettings(granularity=3, temperatures=T2, n=1), tasks={"A": make_task("A"), "B": make_task("B")})
    assert plans(result) == [(0, 0, (), "AB"), (1, 0, (), "AB")]
    assert result.stop_reason == "a full pass over the demonstration groups solved nothing new"
    assert result.buffer == []


def test_round_limit_and_non_adaptive_variants():
    script = {("A", (), 0.4): ["ok"], ("B", ("A",), 0.4): ["ok"], ("C", ("A", "B"), 0.4): ["ok"]}
    tasks = {k: make_task(k) for k in "ABCD"}
    full, _ = run(script, LoopSettings(temperatures=(0.4,), n=1), tasks=tasks)
    # equal success rates: the earlier-earned entry counts as harder
    assert plans(full) == [(0, 0, (), "ABCD"), (1, 0, ("A",), "BCD"), (2, 0, ("A",), "CD"), (2, 1, ("A", "B"), "CD"),
                           (3, 0, ("A",), "D"), (3, 1, ("A", "B"), "D"), (3, 2, ("A", "B", "C"), "D")]
    assert full.unsolved == ["D"]
    limited, _ = run(script, LoopSettings(temperatures=(0.4,), n=1, rounds_limit=2), tasks=tasks)
    assert plans(limited) == [(0, 0, (), "ABCD"), (1, 0, ("A",), "BCD")]
    assert limited.stop_reason == "max_rounds (2) reached"
    assert limited.unsolved == ["C", "D"]
    single, _ = run(script, LoopSettings(temperatures=(0.4,), n=1, adaptive=False), tasks=tasks)
    assert plans(single) == [(0, 0, (), "ABCD")]
    assert single.stop_reason == "variant runs round 0 only"


def test_demonstration_cap_keeps_the_hardest_and_skips_repeats():
    script = {("A", (), 0.4): ["ok", "no", "no", "no"], ("B", (), 0.4): ["ok", "ok", "no", "no"],
              ("C", (), 0.4): ["ok", "ok", "ok", "ok"]}
    tasks = {k: make_task(k) for k in "ABCD"}
    result, _ = run(script, LoopSettings(granularity=3, temperatures=(0.4,), n=4, max_demonstrations=2), tasks=tasks)
    # groups [A], [B], [C]; capped sets: (A), (A, B), (A, B) -> the repeat is skipped
    assert plans(result) == [(0, 0, (), "ABCD"), (1, 0, ("A",), "D"), (1, 1, ("A", "B"), "D")]


def test_seeds_derive_from_config_seed_and_sample_position():
    proposer = ScriptedProposer({})
    run_algorithm1({"A": make_task("A")}, proposer, None, ok_verify, LoopSettings(temperatures=T2, n=1, seed=7,
                                                                         rounds_limit=1), extract=lambda r: r)
    assert [r.seed for r in proposer.requests] == [derive_seed(7, 0, 0, "A", t) for t in T2]
    assert len({r.seed for r in proposer.requests}) == 2


def _e(key, rate, rnd=0):
    return BufferEntry(task_key=key, impl="x", success_count=1, n_samples=1, success_rate=rate, round=rnd,
                       temperature=0.4)


def test_stratify_hardest_first_near_equal_groups():
    entries = [_e("a", 1.0), _e("b", 0.1), _e("c", 0.5), _e("d", 0.1, rnd=1), _e("e", 0.75)]
    groups = stratify(entries, 3)
    assert [[e.task_key for e in g] for g in groups] == [["b", "d"], ["c", "e"], ["a"]]
    assert [[e.task_key for e in g] for g in stratify(entries[:2], 3)] == [["b"], ["a"]]
    assert stratify([], 3) == []
    sets = demonstration_sets(groups)
    assert [[e.task_key for e in d] for d in sets] == [["b", "d"], ["b", "d", "c", "e"], ["b", "d", "c", "e", "a"]]
    assert demonstration_sets([]) == [[]]
    with pytest.raises(ValueError):
        stratify(entries, 0)


class _Timed(Proposer):
    name = "timed"

    def __init__(self):
        self.calls: list[tuple[float, float]] = []

    def propose(self, requests):
        t0 = time.monotonic()
        time.sleep(0.05)
        self.calls.append((t0, time.monotonic()))
        return [[Proposal(raw="ok")] for _ in requests]


def test_generation_overlaps_verification_and_batches_reach_the_sink():
    proposer = _Timed()
    verified: list[tuple[float, float]] = []

    def slow_verify(task, program):
        t0 = time.monotonic()
        time.sleep(0.15)
        verified.append((t0, time.monotonic()))
        return ok_verify(task, program)

    batches = []
    executor = Executor(proposer, None, InlineVerifier(slow_verify), extract=lambda r: r, chunk_size=1,
                        sink=lambda recs: batches.append(len(recs)))
    jobs = [SampleJob(round=0, step=0, task=k, spec=make_task(k), temperature=0.4, n=1, seed=i) for i, k in enumerate("ABC")]
    try:
        records = executor.run(jobs)
    finally:
        executor.close()
    assert [r.task for r in records] == ["A", "B", "C"] and all(r.correct and r.verified for r in records)
    assert sum(batches) == 3
    # the proposer worked on chunks 2 and 3 while chunk 1 was still being verified
    assert proposer.calls[2][0] < verified[0][1]
    assert threading.active_count() >= 1


def test_progress_outputs_follow_the_steps():
    import io

    from rich.console import Console

    from stepforge.loop.progress import LogProgress, RichProgress

    out = io.StringIO()
    log = LogProgress(7, stream=out)
    run_algorithm1(TASKS, ScriptedProposer(SCRIPT), None, ok_verify, LoopSettings(temperatures=T2, n=2),
                   extract=lambda raw: raw, events=log)
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 0 step 0: 7 tasks, 0 demonstrations, 28 samples (0 already recorded)"
    assert lines[1].startswith("round 0 step 0: 28 samples, 7 correct, solved 3 new (3/7), 4 unsolved")
    assert len(lines) == 2 * 6
    screen = io.StringIO()
    rich = RichProgress(7, console=Console(file=screen, force_terminal=True, width=160))
    run_algorithm1(TASKS, ScriptedProposer(SCRIPT), None, ok_verify, LoopSettings(temperatures=T2, n=2),
                   extract=lambda raw: raw, events=rich)
    rich.close()
    text = screen.getvalue()
    assert "round 2 step 2 (4 demos)" in text and "tasks 4/7" in text


# ---------------------------------------------------------------------------
# a seeded buffer (`seed_buffer`): demonstrations from another run


def _seeded(key, rate, rnd=0, impl="ok_seed"):
    return BufferEntry(task_key=key, impl=impl, success_count=1, n_samples=4, success_rate=rate, round=rnd,
                       temperature=0.4, source="other-run/buffer.jsonl")


def test_seeded_entries_are_round1_demonstrations_and_are_not_counted():
    tasks = {k: make_task(k) for k in "ABC"}
    seed_tasks = {"S": make_task("S"), "T": make_task("T")}
    seed = [_seeded("S", 0.25), _seeded("T", 1.0)]
    # A is solved in round 0; B only with the seeded S shown; C never
    script = {("A", (), 0.4): ["ok"], ("B", ("S",), 0.4): ["ok"]}
    proposer = ScriptedProposer(script)
    result = run_algorithm1(tasks, proposer, None, ok_verify, LoopSettings(granularity=3, temperatures=(0.4,), n=1),
                            extract=lambda raw: raw, seed=seed, seed_tasks=seed_tasks)
    assert plans(result) == [
        (0, 0, (), "ABC"),                  # round 0: base knowledge only, whatever D holds
        (1, 0, ("S",), "BC"),               # D = {S .25, A 1, T 1}: the seeded S is the hardest group
        (2, 0, ("S", "A"), "C"),            # B earned at 1.0 in round 1: groups [S, A], [T], [B]
        (2, 1, ("S", "A", "T"), "C"),
        (2, 2, ("S", "A", "T", "B"), "C"),
    ]
    # a seeded demonstration carries its task's IR and its program, as an earned one does
    demo = next(r for r in proposer.requests if r.demonstrations).demonstrations[0]
    assert (demo.task_key, demo.task, demo.impl, demo.success_rate) == ("S", seed_tasks["S"], "ok_seed", 0.25)
    # only what this run earned is its buffer; the seed is reported apart and never re-verified or re-sampled
    assert [e.task_key for e in result.buffer] == ["A", "B"] and all(e.source is None for e in result.buffer)
    assert [e.task_key for e in result.seeded] == ["S", "T"]
    assert not any(r.task_key in ("S", "T") for r in proposer.requests)
    assert result.unsolved == ["C"]


def test_seeded_entry_of_a_task_of_this_run_is_left_out():
    """The seed never shows a task its own answer, and never removes it from X."""
    script = {("A", (), 0.4): ["no"], ("B", (), 0.4): ["ok"], ("A", ("B",), 0.4): ["ok"]}
    proposer = ScriptedProposer(script)
    result = run_algorithm1({"A": make_task("A"), "B": make_task("B")}, proposer, None, ok_verify,
                            LoopSettings(temperatures=(0.4,), n=1), extract=lambda raw: raw,
                            seed=[_seeded("A", 0.1)], seed_tasks={"A": make_task("A")})
    assert plans(result) == [(0, 0, (), "AB"), (1, 0, ("B",), "A")]
    assert result.seeded == [] and [e.task_key for e in result.buffer] == ["B", "A"]


def test_improve_run_with_seed_buffer_records_origin_counts_only_earned_and_resumes(tmp_path):
    """`seed_buffer` in a `stepforge improve` run: buffer.jsonl marks the seeded entries, state and
    summary count only the earned ones, the seed is kept in the run directory for --resume."""
    import json

    import yaml

    from stepforge.loop.job import run_improve
    from stepforge.loop.runstore import RunStore

    easy, hard, seeded = "moe-index/G_0_3_04", "moe-index/G_0_3_03", "rope/G_0_3_02"
    source = tmp_path / "source"
    source.mkdir()
    from stepforge.benchmark.schema import load_benchmark

    ref = load_benchmark()[seeded].impl
    (source / "buffer.jsonl").write_text(BufferEntry(task_key=seeded, impl=ref, success_count=1, n_samples=8,
                                                     success_rate=0.125, round=2, temperature=0.7).model_dump_json()
                                         + "\n")
    config = {
        "name": "seeded", "tasks": [easy, hard], "variant": "agent+si", "seed_buffer": str(source),
        "proposer": {"kind": "custom", "factory": "test_loop_scripted:benchmark_factory",
                     "options": {"every": 1, "needs_demos": [hard]}},
        "guardian": {"kind": "rule"}, "granularity": 3, "temperatures": [0.4], "n": 1, "max_rounds": 3,
        "verifier": {"kind": "inline", "seeds": [0]}, "progress": False,
    }
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_improve(path, run_dir=tmp_path / "run")
    run = tmp_path / "run"
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert [(s["round"], s["step"], s["demonstrations"], s["solved"]) for s in steps] == [
        (0, 0, [], [easy]),                    # round 0: no demonstrations although D holds the seed
        (1, 0, [seeded], [hard]),              # the seeded entry (rate .125) is the hardest group
    ]
    buffer = [BufferEntry.model_validate_json(x) for x in (run / "buffer.jsonl").read_text().splitlines()]
    assert [(e.task_key, e.source) for e in buffer] == [(seeded, str(source / "buffer.jsonl")), (easy, None),
                                                        (hard, None)]
    assert buffer[0].impl == ref and buffer[0].round == 2  # copied as it was, not re-verified
    summary = outcome.summary
    assert summary["run"]["tasks"] == 2 and summary["run"]["tasks_solved"] == 2
    assert summary["buffer"] == [easy, hard] and summary["seeded"] == [seeded]
    assert seeded not in summary["tasks"] and seeded not in summary["programs"]
    state = json.loads((run / "state.json").read_text())
    assert state["solved"] == [easy, hard] and state["seeded"] == [seeded]
    assert "Seeded demonstrations (1" in (run / "report.md").read_text()
    assert [e.task_key for e in outcome.result.buffer] == [easy, hard]

    # resume replays from the run's own copy of the seed, even when the source has changed since
    (source / "buffer.jsonl").write_text("")
    state["status"] = "running"
    (run / "state.json").write_text(json.dumps(state))
    before = (run / "samples.jsonl").read_text()
    again = run_improve(None, resume=run)
    assert again.new_samples == 0 and (run / "samples.jsonl").read_text() == before
    assert again.summary["seeded"] == [seeded] and again.summary["buffer"] == [easy, hard]
    with RunStore.open(run, lock=False) as store:
        assert [e.task_key for e in store.load_buffer()] == [seeded, easy, hard]


def test_seed_buffer_errors_name_the_key(tmp_path):
    import yaml

    from stepforge.loop.config import ConfigError
    from stepforge.loop.job import run_improve

    config = {"tasks": ["moe-index/G_0_3_04"], "seed_buffer": str(tmp_path / "nope"), "progress": False,
              "verifier": {"kind": "inline"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"c.yaml: seed_buffer: .*nope: no such file"):
        run_improve(path, run_dir=tmp_path / "r1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_seeded("no/such_task", 0.5).model_dump_json() + "\n")
    with pytest.raises(ConfigError, match="not in the benchmark: no/such_task"):
        run_improve(path, run_dir=tmp_path / "r2", overrides=[f"seed_buffer={bad}"])
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 1: not a buffer entry"):
        run_improve(path, run_dir=tmp_path / "r3", overrides=[f"seed_buffer={bad}"])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()  # refused before the run starts
