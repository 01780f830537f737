"""Early stop (loop/early_stop.py): a task's sampling in a step stops once a sample is correct.

A scripted streaming proposer counts the proposals drawn from it; the rule
(sample s is drawn once the verdicts of samples 0 .. s - LAG are in, and not
when one of them is correct) is checked against a reference model of it, with
a verifier that answers at once and one that answers late from a thread.
"""

from __future__ import annotations

import queue
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_task
from test_loop_scripted import ok_verify

from stepforge.loop.algorithm import LoopSettings, run_algorithm1
from stepforge.loop.early_stop import LAG
from stepforge.loop.executor import Executor, SampleJob
from stepforge.loop.interfaces import Proposal, ProposalRequest, StreamingProposer
from stepforge.loop.verifiers import InlineVerifier, VerifierBackend, unpack_item

TEMPS = (0.4, 0.7, 1.0)


class StreamScripted(StreamingProposer):
    """Replies per (task, temperature), given one at a time; counts what was drawn per request."""

    name = "stream-scripted"

    def __init__(self, script: dict[tuple[str, float], list[str]]):
        self.script = script
        self.drawn: dict[tuple[str, float], int] = {}

    def iter_proposals(self, request: ProposalRequest):
        key = (request.task_key, request.temperature)
        self.drawn[key] = 0
        for text in self.script.get(key, ["no"] * request.n)[: request.n]:
            self.drawn[key] += 1
            yield Proposal(raw=text, seconds=0.001)

    def propose(self, requests):
        return [list(self.iter_proposals(r)) for r in requests]


class LateVerifier(VerifierBackend):
    """Verdicts from a thread after `delay_s` each (so the generation thread must wait for them)."""

    def __init__(self, delay_s: float = 0.01):
        self.delay_s = delay_s
        self._in: "queue.Queue" = queue.Queue()
        self._out: "queue.Queue" = queue.Queue()
        self._pending = 0
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while True:
            ticket, task, program, _mode = unpack_item(self._in.get())
            time.sleep(self.delay_s)
            self._out.put((ticket, ok_verify(task, program)))

    def submit(self, items):
        self._pending += len(items)
        for item in items:
            self._in.put(item)

    def poll(self, timeout=0.0):
        out = []
        try:
            out.append(self._out.get(timeout=timeout) if timeout > 0 else self._out.get_nowait())
            while True:
                out.append(self._out.get_nowait())
        except queue.Empty:
            pass
        self._pending -= len(out)
        return out

    def pending(self):
        return self._pending


def expected_draws(replies_by_temp: list[list[str]], n: int) -> list[tuple[int, bool]]:
    """The rule, by hand: (drawn, stopped) per temperature; one sequence over the temperatures, and sample s
    is not drawn when a sample <= s - LAG is correct."""
    out, seq, first_ok = [], 0, None
    for replies in replies_by_temp:
        drawn, stopped = 0, False
        while drawn < n:
            if first_ok is not None and first_ok <= seq - LAG:
                stopped = True
                break
            if drawn >= len(replies):
                break
            if replies[drawn].startswith("ok") and first_ok is None:
                first_ok = seq
            drawn += 1
            seq += 1
        out.append((drawn, stopped))
    return out


def run_jobs(script, n, verifier, tasks="AB", solved=(), stop=True):
    proposer = StreamScripted(script)
    executor = Executor(proposer, None, verifier, extract=lambda r: r, stop_when_solved=stop)
    jobs = [SampleJob(round=0, step=0, task=k, spec=make_task(k), temperature=t, n=n, seed=i)
            for i, k in enumerate(tasks) for t in TEMPS]
    try:
        return executor.run(jobs, solved=solved), proposer
    finally:
        executor.close()


def test_a_task_stops_after_its_first_correct_sample_and_its_later_temperatures_draw_nothing():
    script = {("A", 0.4): ["no", "ok", "no", "no", "no", "no"], ("A", 0.7): ["ok"] * 6, ("A", 1.0): ["ok"] * 6}
    records, proposer = run_jobs(script, 6, InlineVerifier(ok_verify))
    a = [r for r in records if r.task == "A"]
    # samples 0 and 1 drawn, sample 2 drawn while 1 is verified (LAG 2), then stop: 0.7 and 1.0 draw nothing
    assert [r.index for r in a] == [0, 1, 2] and [r.correct for r in a] == [False, True, False]
    assert all(r.of == 3 for r in a)
    assert [proposer.drawn.get(("A", t), 0) for t in TEMPS] == [3, 0, 0]
    # an unsolved task draws every sample at every temperature
    assert [proposer.drawn[("B", t)] for t in TEMPS] == [6, 6, 6]
    assert len([r for r in records if r.task == "B"]) == 18


def test_without_early_stop_every_sample_is_drawn():
    script = {("A", t): ["ok"] * 4 for t in TEMPS}
    records, proposer = run_jobs(script, 4, InlineVerifier(ok_verify), stop=False)
    assert [proposer.drawn[("A", t)] for t in TEMPS] == [4, 4, 4] and len(records) == 24


def test_a_task_already_solved_in_the_step_is_not_sampled():
    records, proposer = run_jobs({}, 3, InlineVerifier(ok_verify), solved={"A"})
    assert ("A", 0.4) not in proposer.drawn and {r.task for r in records} == {"B"}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["ok", "no"]), min_size=0, max_size=5), min_size=3, max_size=3),
       st.booleans())
def test_what_is_drawn_depends_on_verdicts_only_never_on_timing(replies, late):
    script = {("A", t): r for t, r in zip(TEMPS, replies)}
    verifier = LateVerifier(0.002) if late else InlineVerifier(ok_verify)
    records, proposer = run_jobs(script, 5, verifier, tasks="A")
    want = expected_draws(replies, 5)
    assert [proposer.drawn.get(("A", t), 0) for t in TEMPS] == [d for d, _ in want]
    for t, (drawn, stopped) in zip(TEMPS, want):
        got = [r for r in records if r.temperature == t]
        if drawn:
            assert [r.index for r in got] == list(range(drawn)) and all(r.of == drawn for r in got)
        elif stopped:
            assert got == []
        else:  # a request that found nothing gives n failed samples, as in the chunked path
            assert len(got) == 5 and not any(r.correct for r in got)


def test_loop_with_a_streaming_proposer_solves_and_records_only_what_was_needed():
    tasks = {k: make_task(k) for k in "AB"}
    script = {("A", 0.4): ["ok"] * 4, ("B", 0.4): ["no"] * 4, ("B", 1.0): ["no", "no", "ok", "ok"]}
    proposer = StreamScripted(script)
    result = run_algorithm1(tasks, proposer, None, ok_verify, LoopSettings(temperatures=(0.4, 1.0), n=4),
                            extract=lambda r: r)
    assert result.unsolved == [] and result.rounds == 1
    step = result.steps[0]
    assert sorted(step.solved) == ["A", "B"]
    # A: samples 0, 1 (1 drawn while 0 was verified); B: 4 at 0.4, 4 at 1.0 (its 3rd is correct, the 4th
    # was drawn while the 3rd was verified)
    assert [(r.task, r.temperature, r.index) for r in step.records] == [
        ("A", 0.4, 0), ("A", 0.4, 1),
        ("B", 0.4, 0), ("B", 0.4, 1), ("B", 0.4, 2), ("B", 0.4, 3),
        ("B", 1.0, 0), ("B", 1.0, 1), ("B", 1.0, 2), ("B", 1.0, 3)]
    entry = next(e for e in result.buffer if e.task_key == "B")
    assert entry.n_samples == 8


class ModeRecordingVerifier(InlineVerifier):
    """InlineVerifier that remembers the mode of every item it was given."""

    def __init__(self):
        super().__init__(ok_verify)
        self.modes: list[str] = []

    def submit(self, items):
        self.modes.extend(item[3] if len(item) > 3 else "closed" for item in items)
        super().submit([item[:3] for item in items])


def test_an_open_job_reaches_the_verifier_as_open_items():
    """The early-stop path used to drop the sample's mode, so every open candidate was parsed as a program."""
    verifier = ModeRecordingVerifier()
    proposer = StreamScripted({("A", 0.4): ["no", "ok"]})
    executor = Executor(proposer, None, verifier, extract=lambda r: r, open_extract=lambda r: r, stop_when_solved=True)
    jobs = [SampleJob(round=0, step=0, task="A", spec=make_task("A"), temperature=0.4, n=2, seed=0, mode="open")]
    try:
        records = executor.run(jobs)
    finally:
        executor.close()
    assert [r.correct for r in records] == [False, True] and all(r.mode == "open" for r in records)
    assert verifier.modes == ["open", "open"]
