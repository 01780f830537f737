"""Early stop: a step's samples streamed to the verifier, a task's sampling stopped once one is correct.

With a `StreamingProposer` (the search proposer) the executor runs a step
through `run_streaming` instead of whole chunks: on the generation thread
each job's proposals are drawn one at a time, extracted and guarded, and
handed to the main thread, which verifies them at once. A task's samples of
one step form one sequence over its jobs (its temperatures, in job order).

The rule, which depends only on verdicts and never on timing: before sample
`s` of a task is drawn, the verdicts of its samples `0 .. s - LAG` are
awaited; if one of them is correct, the task stops (the rest of the job and
its later jobs of the step are not drawn). So `LAG - 1` samples are verified
while the next one is searched for, and a task solved by sample `k` costs at
most `k + LAG` samples. Tasks in `solved` (correct in this step's records
already on disk, on `--resume`) are not drawn at all.

A job's records carry `of` = the samples it drew, so they are handed to the
sink once the job has finished and their verdicts are in. A job that drew
nothing without being stopped (a search that found no program) gives n
failed samples, as in the chunked path.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Collection, Optional

from stepforge.loop.runstore import SampleRecord

if TYPE_CHECKING:  # the executor imports this module
    from stepforge.loop.executor import Executor, SampleJob

LAG = 2  # a task's samples in flight: sample s is drawn once the verdicts of samples 0 .. s - LAG are in


class _Aborted(Exception):
    """The main thread gave up on the step (an error or Ctrl-C)."""


class Ledger:
    """Per task of one step: samples drawn and their verdicts, shared by the two threads."""

    def __init__(self, solved: Collection[str] = (), lag: int = LAG):
        self.lag = max(1, lag)
        self._cond = threading.Condition()
        self._drawn: dict[str, int] = defaultdict(int)
        self._verdicts: dict[str, dict[int, bool]] = defaultdict(dict)
        self._prefix: dict[str, int] = defaultdict(int)  # leading samples whose verdicts are in
        self._first_correct: dict[str, int] = {}
        self._solved = set(solved)
        self.aborted = False

    def may_draw(self, task: str) -> bool:
        """Whether the task's next sample is to be drawn (waits for the verdicts the rule needs)."""
        with self._cond:
            if task in self._solved:
                return False
            last = self._drawn[task] - self.lag  # verdicts 0 .. last decide
            while True:
                if self.aborted:
                    raise _Aborted
                if self._first_correct.get(task, last + 1) <= last:
                    return False
                if self._prefix[task] > last:
                    return True
                self._cond.wait(0.1)

    def drawn(self, task: str) -> int:
        """Count one more drawn sample of `task`; its position in the task's sequence."""
        with self._cond:
            seq = self._drawn[task]
            self._drawn[task] = seq + 1
            return seq

    def verdict(self, task: str, seq: int, passed: bool) -> None:
        """The verdict of the task's sample `seq` is in."""
        with self._cond:
            got = self._verdicts[task]
            got[seq] = passed
            if passed and seq < self._first_correct.get(task, seq + 1):
                self._first_correct[task] = seq
            while self._prefix[task] in got:
                self._prefix[task] += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


def _produce(executor: "Executor", jobs: list["SampleJob"], ledger: Ledger, outbox: "queue.Queue") -> None:
    """Generation thread: draw each job's proposals while the rule allows; extract and guard each one."""
    proposer = executor.proposer
    try:
        for ji, job in enumerate(jobs):
            free = dataclasses.replace(job, skip=frozenset())  # a recorded index is verified again (not recorded)
            drawn, stopped = 0, False
            proposals = iter(proposer.iter_proposals(job.request()))
            while drawn < job.n:
                if not ledger.may_draw(job.task):
                    stopped = True
                    break
                prop = next(proposals, None)
                if prop is None:
                    break
                gen = executor._prepare([free], [[prop]], prop.seconds, first=drawn)
                outbox.put(("sample", ji, ledger.drawn(job.task), gen))
                drawn += 1
            outbox.put(("done", ji, drawn, stopped))
    except _Aborted:
        return
    finally:
        outbox.put(None)


def run_streaming(executor: "Executor", jobs: list["SampleJob"], solved: Collection[str] = ()) -> list[SampleRecord]:
    """The jobs' new samples, drawn under the early-stop rule (order: job, then index)."""
    ledger = Ledger(solved)
    outbox: "queue.Queue[Optional[tuple]]" = queue.Queue()
    fut = executor._gen.submit(_produce, executor, jobs, ledger, outbox)
    pending: dict[int, SampleRecord] = {}
    where: dict[int, tuple[int, int]] = {}  # ticket -> (job index, sequence number in its task)
    held: dict[int, list[SampleRecord]] = defaultdict(list)  # verified records of jobs still drawing
    count: dict[int, int] = {}
    records: list[SampleRecord] = []
    ticket = 0

    def settle(ji: int, seq: int, rec: SampleRecord) -> None:
        ledger.verdict(rec.task, seq, bool(rec.correct))
        if rec.index in jobs[ji].skip:
            return
        if ji in count:
            rec.of = count[ji]
            executor._emit([rec], records)
        else:
            held[ji].append(rec)

    producing = True
    try:
        while producing or pending:
            try:
                item = outbox.get(timeout=0.01 if pending else 0.2)
            except queue.Empty:
                item = False
            if item is None:
                producing = False
                fut.result()  # re-raise what the generation thread raised
            elif item and item[0] == "sample":
                _, ji, seq, gen = item
                for rec in executor._records(gen):
                    if rec.program is None or rec.guarded is None:
                        settle(ji, seq, rec)
                    else:
                        pending[ticket], where[ticket] = rec, (ji, seq)
                        executor.verifier.submit([(ticket, rec.task, rec.guarded, rec.mode)])
                        ticket += 1
            elif item:
                _, ji, drawn, stopped = item
                count[ji] = drawn
                if drawn == 0 and not stopped:
                    executor._emit(executor._records(executor._prepare([jobs[ji]], [[]], 0.0)), records)
                batch = held.pop(ji, [])
                for rec in batch:
                    rec.of = drawn
                executor._emit(batch, records)
            if pending:
                for t, rec in executor._verified(pending, executor.verifier.poll(0.0)):
                    settle(*where.pop(t), rec)
    except BaseException:
        ledger.abort()
        raise
    order = {(j.round, j.step, j.task, j.temperature): i for i, j in enumerate(jobs)}
    records.sort(key=lambda r: (order[(r.round, r.step, r.task, r.temperature)], r.index))
    return records


__all__ = ["LAG", "Ledger", "run_streaming"]
