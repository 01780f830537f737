"""Running one step of Algorithm 1: generate, guard and verify, overlapped.

The driver hands the `Executor` a list of `SampleJob`s (one proposal request
per (task, temperature), n samples each). The executor

1. queues every chunk of `chunk_size` requests on a generation thread at
   once, so the proposer (a Ray `ModelPool` behind an LLM proposer, or the
   in-process search proposer) works through them back to back and is never
   idle waiting for verification; the replies are parsed and the guardian
   runs on the same thread right after each chunk's proposals (guarding is
   model work too, for the LLM guardian);
2. while generation goes on, the main thread submits each finished chunk's
   programs to the verifier backend and collects verdicts as
   they finish (`ray.wait` for Ray actors, a feeder thread for the process
   pool), writing each finished batch of samples to the run directory at
   once (the `sink`).

The verifier backends live in `loop/verifiers.py`, the progress callbacks in
`loop/progress.py`.

Every record a job produces has a deterministic key (round, step, task,
temperature, index) and its proposer seed is the job's; indices already on
disk (`SampleJob.skip`) are generated again (the request is seeded as a
whole) but not recorded again.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional

from stepforge.benchmark.schema import Task
from stepforge.benchmark.verdict import Verdict, failed
from stepforge.errors import short_text
from stepforge.loop.early_stop import run_streaming
from stepforge.loop.interfaces import (
    Demonstration,
    Guardian,
    GuardRequest,
    GuardResult,
    Proposal,
    ProposalRequest,
    Proposer,
    RepairTurn,
    StreamingProposer,
)
from stepforge.loop.progress import Events
from stepforge.loop.runstore import SampleRecord
from stepforge.loop.verifiers import VerifierBackend

ExtractFn = Callable[[str], Any]  # -> program or None, or (program or None, reason)


# ---------------------------------------------------------------------------
# seeds and jobs


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    text = "|".join(repr(p) if isinstance(p, float) else str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def prompt_id(messages: Optional[list[dict[str, str]]]) -> Optional[str]:
    """A stable id of a chat prompt (None when there is none, e.g. search proposals)."""
    if not messages:
        return None
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SampleJob:
    """One proposal request of a step: n samples of one task at one temperature."""

    round: int
    step: int
    task: str
    spec: Task  # the task itself (`task` is its key)
    temperature: float
    n: int
    seed: int
    demonstrations: list[Demonstration] = field(default_factory=list)
    skip: frozenset[int] = frozenset()  # sample indices already recorded
    # a repair turn (turn > 0): one follow-up of sample `index`, answering `parent` after `history`
    turn: int = 0
    index: Optional[int] = None
    parent: Optional[str] = None
    history: list[RepairTurn] = field(default_factory=list)
    mode: str = "closed"  # open: candidates are fns + impl YAML (loop/candidates.py)

    @property
    def demo_keys(self) -> list[str]:
        return [d.task_key for d in self.demonstrations]

    def request(self) -> ProposalRequest:
        return ProposalRequest(task_key=self.task, task=self.spec, demonstrations=self.demonstrations,
                               n=self.n, temperature=self.temperature, seed=self.seed, round=self.round,
                               mode=self.mode, history=self.history)


def default_extract(raw: str) -> tuple[Optional[str], str]:
    """(program, "") or (None, reason), via the agents' lenient parser (`loop/agents/replies.py`)."""
    from stepforge.loop.agents.replies import extract_program_with_reason

    found, reason = extract_program_with_reason(raw)
    if found is None:
        return None, reason or "no program found in the reply"
    return found.program, ""


def default_open_extract(raw: str) -> tuple[Optional[str], str]:
    """(candidate YAML, "") or (None, reason) for an open-mode reply (`replies.extract_candidate_with_reason`)."""
    from stepforge.loop.agents.replies import extract_candidate_with_reason

    return extract_candidate_with_reason(raw)


def _extracted(value: Any) -> tuple[Optional[str], str]:
    """An extract function may return a program (or None) or (program, reason)."""
    if isinstance(value, tuple):
        program, reason = value
    else:
        program, reason = value, ""
    if program is not None and not str(program).strip():
        program = None
    if program is None and not reason:
        reason = "no program found in the reply"
    return (str(program) if program is not None else None), reason


# ---------------------------------------------------------------------------
# one candidate's failure stays that candidate's verdict

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with lone surrogates (which UTF-8 cannot hold) replaced by U+FFFD, so its record can be written."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _storable_proposal(proposal: Proposal) -> Proposal:
    raw, error = storable(proposal.raw), storable(proposal.error) if proposal.error is not None else None
    return proposal if (raw, error) == (proposal.raw, proposal.error) else \
        proposal.model_copy(update={"raw": raw, "error": error})


def contained(what: str, fn: Callable, *args) -> tuple[Any, Optional[str]]:
    """`(fn(*args), None)`, or `(None, one-line reason)` when it raises: for work on one candidate, whose
    failure must end as that candidate's failed sample, never as the run's end."""
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - any failure of untrusted input or a plug-in is the candidate's
        detail = short_text(exc)
        return None, storable(f"{what} failed: {type(exc).__name__}" + (f": {detail}" if detail else ""))


# ---------------------------------------------------------------------------
# the executor


class _GenerationThread:
    """One daemon thread running generation calls in order.

    Unlike a ThreadPoolExecutor's worker it is not joined at interpreter
    exit, so Ctrl-C during a long model or search call ends the run at once
    (the call's results are not needed: they were never recorded).
    """

    def __init__(self):
        self._queue: "queue.Queue[Optional[tuple[Future, Callable, tuple]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, fn: Callable, *args) -> Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="stepforge-generate", daemon=True)
            self._thread.start()
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)

    def stop(self) -> None:
        """Cancel what has not started; the running call (if any) is abandoned."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._queue.put(None)


@dataclass
class _Generated:
    """A chunk after generation and guarding (produced on the generation thread)."""

    jobs: list[SampleJob]
    proposals: list[list[Proposal]]
    programs: list[list[Optional[str]]]
    reasons: list[list[str]]  # why extraction failed, per proposal ("" when it did not)
    guarded: list[list[Optional[Any]]]
    guard_errors: list[list[Optional[str]]]  # why the guardian gave no result, per proposal (None when it did)
    generate_s: float
    guard_s: float
    n_guarded: int
    first: int = 0  # sample index of each job's first proposal (a streamed proposal's own index)


class Executor:
    """Generates, guards and verifies the jobs of one step with generation and verification overlapped."""

    def __init__(self, proposer: Proposer, guardian: Optional[Guardian], verifier: VerifierBackend, *,
                 extract: Optional[ExtractFn] = None, open_extract: Optional[ExtractFn] = None,
                 chunk_size: int = 8, guard_temperature: float = 0.0,
                 sink: Optional[Callable[[list[SampleRecord]], None]] = None,
                 prompt_sink: Optional[Callable[[dict[str, list[dict[str, str]]]], None]] = None,
                 events: Optional[Events] = None, stop_when_solved: bool = True):
        self.proposer = proposer
        self.stop_when_solved = stop_when_solved
        self.guardian = guardian
        self.verifier = verifier
        self.extract = extract or default_extract
        self.open_extract = open_extract or default_open_extract
        self.chunk_size = max(1, chunk_size)
        self.guard_temperature = guard_temperature
        self.sink = sink
        self.prompt_sink = prompt_sink
        self.events = events or Events()
        self._gen = _GenerationThread()

    def close(self) -> None:
        self._gen.stop()
        self.verifier.close()

    # -- generation thread ------------------------------------------------
    def _generate(self, jobs: list[SampleJob]) -> _Generated:
        t0 = time.perf_counter()
        proposals = self.proposer.propose([j.request() for j in jobs])
        generate_s = time.perf_counter() - t0
        if len(proposals) != len(jobs):
            raise RuntimeError(f"proposer {getattr(self.proposer, 'name', '?')} returned {len(proposals)} lists "
                               f"for {len(jobs)} requests")
        return self._prepare(jobs, [list(p)[: j.n] for p, j in zip(proposals, jobs)], generate_s)

    def _prepare(self, jobs: list[SampleJob], proposals: list[list[Proposal]], generate_s: float,
                 first: int = 0) -> _Generated:
        """Extract and guard the programs of the jobs' proposals, indexed from `first` (on the generation thread).

        One candidate's failure (its reply cannot be read, the guardian fails on it) is that candidate's
        failed sample, never the run's end."""
        proposals = [[_storable_proposal(p) for p in props] for props in proposals]
        extracted = [[(None, p.error) if p.error is not None else self._extract_one(p.raw, job.mode)
                      for p in props] for props, job in zip(proposals, jobs)]
        programs = [[prog for prog, _ in row] for row in extracted]
        reasons = [[why for _, why in row] for row in extracted]
        guarded: list[list[Optional[Any]]] = [[None] * len(props) for props in proposals]
        guard_errors: list[list[Optional[str]]] = [[None] * len(props) for props in proposals]
        guard_s, n_guarded = 0.0, 0
        if self.guardian is not None:
            requests, where = [], []
            for a, (job, progs) in enumerate(zip(jobs, programs)):
                for b, prog in enumerate(progs, first):
                    if prog is not None and b not in job.skip:
                        requests.append(GuardRequest(task_key=job.task, task=job.spec, program=prog,
                                                     temperature=self.guard_temperature,
                                                     seed=derive_seed(job.seed, b, "guard"), mode=job.mode))
                        where.append((a, b))
            if requests:
                t1 = time.perf_counter()
                results = self._guard(requests)
                guard_s = time.perf_counter() - t1
                for (a, b), (res, error) in zip(where, results):
                    guarded[a][b - first], guard_errors[a][b - first] = res, error
                n_guarded = len(requests)
        return _Generated(jobs, proposals, programs, reasons, guarded, guard_errors, generate_s, guard_s, n_guarded,
                          first)

    def _extract_one(self, raw: str, mode: str = "closed") -> tuple[Optional[str], str]:
        """(program, "") or (None, reason) for one reply (open mode: a candidate); an extractor that raises
        is that reply's reason."""
        extract = self.open_extract if mode == "open" else self.extract
        value, error = contained("reading the reply", lambda text: _extracted(extract(text)), raw)
        return (None, error) if error is not None else value

    def _guard(self, requests: list[GuardRequest]) -> list[tuple[Optional[GuardResult], Optional[str]]]:
        """(result, None) or (None, reason) per request. When the guardian fails on the batch, each
        request is guarded alone, so one request it cannot handle fails only that request's samples."""
        results, error = contained(f"the {self.guardian.name} guardian", self._guard_batch, requests)
        if error is None:
            return [(res, None) for res in results]
        if len(requests) == 1:
            return [(None, error)]
        out: list[tuple[Optional[GuardResult], Optional[str]]] = []
        for req in requests:
            one, error = contained(f"the {self.guardian.name} guardian", self._guard_batch, [req])
            out.append((one[0], None) if error is None else (None, error))
        return out

    def _guard_batch(self, requests: list[GuardRequest]) -> list[GuardResult]:
        results = list(self.guardian.repair(requests))
        if len(results) != len(requests) or not all(isinstance(r, GuardResult) for r in results):
            raise RuntimeError(f"returned {len(results)} results for {len(requests)} requests")
        return [r.model_copy(update={"program": storable(r.program)}) for r in results]

    # -- main thread ------------------------------------------------------
    def run(self, jobs: list[SampleJob], solved: Collection[str] = ()) -> list[SampleRecord]:
        """Every job's new samples (indices in `skip` left out), in job and index order.

        With `stop_when_solved` and a streaming proposer, a task's sampling
        stops once one of its samples is correct (`loop/early_stop.py`);
        tasks in `solved` (already correct in this step) are then not sampled.
        """
        if not jobs:
            return []
        if self.stop_when_solved and isinstance(self.proposer, StreamingProposer):
            return run_streaming(self, jobs, solved)
        chunks = [jobs[i : i + self.chunk_size] for i in range(0, len(jobs), self.chunk_size)]
        futures: list[Future] = [self._gen.submit(self._generate, chunk) for chunk in chunks]
        pending: dict[int, SampleRecord] = {}
        records: list[SampleRecord] = []
        ticket = 0
        try:
            for fut in futures:
                while not fut.done():
                    self._collect(pending, records, timeout=0.05)
                gen = fut.result()
                immediate, items = [], []
                for rec in self._records(gen):
                    if rec.program is None or rec.guarded is None:
                        immediate.append(rec)
                    else:
                        pending[ticket] = rec
                        items.append((ticket, rec.task, rec.guarded, rec.mode))
                        ticket += 1
                self._emit(immediate, records)
                self.verifier.submit(items)
                self._collect(pending, records, timeout=0.0)
            while pending:
                self._collect(pending, records, timeout=0.2)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        order = {id(j): i for i, j in enumerate(jobs)}
        index = {(j.round, j.step, j.task, j.temperature, j.turn, j.index): order[id(j)] for j in jobs}
        records.sort(key=lambda r: (index[(r.round, r.step, r.task, r.temperature, r.turn,
                                           r.index if r.turn else None)], r.index))
        return records

    def _records(self, gen: _Generated) -> list[SampleRecord]:
        """Sample records of a generated chunk, verdicts still to come (except extraction failures)."""
        out: list[SampleRecord] = []
        prompts: dict[str, list[dict[str, str]]] = {}
        n_props = sum(len(p) for p in gen.proposals) or 1
        now = time.time()
        for job, props, progs, whys, guards, guard_errors in zip(gen.jobs, gen.proposals, gen.programs, gen.reasons,
                                                                 gen.guarded, gen.guard_errors):
            if not props:  # nothing came back (a search that found no program): n failed samples
                why = f"the {getattr(self.proposer, 'name', 'proposer')} returned no proposal"
                props = [Proposal(raw="", error=why)] * job.n
                progs, whys, guards, guard_errors = [None] * job.n, [why] * job.n, [None] * job.n, [None] * job.n
            for b, (prop, prog, why, guard, guard_error) in enumerate(zip(props, progs, whys, guards, guard_errors),
                                                                      gen.first):
                if b in job.skip:
                    continue
                pid = prompt_id(prop.messages)
                if pid is not None:
                    prompts[pid] = prop.messages
                guarded = prog
                changed = False
                g_prompt = g_completion = 0
                if guard is not None:
                    guarded = guard.program
                    changed = bool(guard.changed)
                    g_prompt, g_completion = guard.prompt_tokens, guard.completion_tokens
                timings = {"generate_s": round(prop.seconds if prop.seconds > 0 else gen.generate_s / n_props, 6),
                           "guard_s": round(gen.guard_s / gen.n_guarded, 6) if guard is not None else 0.0,
                           "verify_s": 0.0}
                if prop.error is not None:
                    verdict = failed("generate", prop.error)
                elif prog is None:
                    verdict = failed("parse", why)
                elif guard_error is not None:  # the guardian failed on this candidate: not verified
                    verdict, guarded = failed("generate", guard_error), None
                else:
                    verdict = Verdict(passed=False, stage="pending")
                out.append(SampleRecord(
                    round=job.round, step=job.step, task=job.task, temperature=job.temperature,
                    index=job.index if job.index is not None else b, turn=job.turn, parent=job.parent,
                    of=len(props), seed=job.seed, demonstrations=job.demo_keys, prompt_id=pid, raw=prop.raw,
                    mode=job.mode,
                    program=prog, guarded=guarded if prog is not None else None, guard_changed=changed,
                    verdict=verdict, prompt_tokens=prop.prompt_tokens, completion_tokens=prop.completion_tokens,
                    guard_prompt_tokens=g_prompt, guard_completion_tokens=g_completion, timings=timings, time=now,
                    cost=dict(prop.cost), dropped_demonstrations=list(prop.dropped)))
        if prompts and self.prompt_sink is not None:
            self.prompt_sink(prompts)
        return out

    def _collect(self, pending: dict[int, SampleRecord], records: list[SampleRecord], timeout: float) -> None:
        if not pending:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return
        self._emit([rec for _, rec in self._verified(pending, self.verifier.poll(timeout))], records)

    @staticmethod
    def _verified(pending: dict[int, SampleRecord], done: list[tuple[int, Verdict]]) -> list[tuple[int, SampleRecord]]:
        """The pending records of the finished tickets, their verdicts filled in (and taken out of `pending`)."""
        batch = []
        for ticket, verdict in done:
            rec = pending.pop(ticket)
            rec.verdict = verdict
            rec.verified = True
            rec.correct = verdict.passed
            rec.timings["verify_s"] = verdict.seconds
            rec.time = time.time()
            batch.append((ticket, rec))
        return batch

    def _emit(self, batch: list[SampleRecord], records: list[SampleRecord]) -> None:
        if not batch:
            return
        if self.sink is not None:
            self.sink(batch)
        records.extend(batch)
        self.events.samples_recorded(batch)


__all__ = [
    "Executor",
    "SampleJob",
    "default_extract",
    "default_open_extract",
    "derive_seed",
    "prompt_id",
]
