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

Verifier backends (`VerifierBackend`: submit / poll / pending):

- `InlineVerifier`: a verify function called in this process (tests,
  debugging; no time limit).
- `PoolVerifier`: the benchmark's `VerifierPool` (warm worker processes, a
  time limit per verification, a worker that exceeds it is replaced).
- `RayVerifier`: Ray actors each holding a warm verifier, one verification
  in flight per actor; one that exceeds `timeout_s` is killed and replaced
  and the candidate is scored `timeout`; one that dies is replaced and the
  candidate scored `runtime`.

Every record a job produces has a deterministic key (round, step, task,
temperature, index) and its proposer seed is the job's; indices already on
disk (`SampleJob.skip`) are generated again (the request is seeded as a
whole) but not recorded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from stepforge.loop.interfaces import Demonstration, GuardRequest, Guardian, Proposal, ProposalRequest, Proposer
from stepforge.loop.runstore import SampleRecord, VerdictRecord

VerifyFn = Callable[[str, str], Any]  # (task key, program) -> a Verdict-like object
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
    task_ir: str
    temperature: float
    n: int
    seed: int
    demonstrations: list[Demonstration] = field(default_factory=list)
    skip: frozenset[int] = frozenset()  # sample indices already recorded

    @property
    def demo_keys(self) -> list[str]:
        return [d.task_key for d in self.demonstrations]

    def request(self) -> ProposalRequest:
        return ProposalRequest(task_key=self.task, task_ir=self.task_ir, demonstrations=self.demonstrations,
                               n=self.n, temperature=self.temperature, seed=self.seed)


def default_extract(raw: str) -> tuple[Optional[str], str]:
    """(program, "") or (None, reason), via the agents' lenient parser (`loop/agents/replies.py`)."""
    from stepforge.loop.agents.replies import extract_program_with_reason

    found, reason = extract_program_with_reason(raw)
    if found is None:
        return None, reason or "no program found in the reply"
    return found.program, ""


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
# verifier backends


class VerifierBackend(ABC):
    """Asynchronous verification: submit (ticket, task key, program) items, poll for verdicts."""

    @abstractmethod
    def submit(self, items: list[tuple[int, str, str]]) -> None:
        """Queue items for verification."""

    @abstractmethod
    def poll(self, timeout: float = 0.0) -> list[tuple[int, VerdictRecord]]:
        """Verdicts finished so far (waiting up to `timeout` seconds for the first one)."""

    @abstractmethod
    def pending(self) -> int:
        """Items submitted and not yet returned by poll."""

    def close(self) -> None:
        """Release workers."""


class InlineVerifier(VerifierBackend):
    """Verifies in this process, at submit time (no time limit)."""

    def __init__(self, verify: VerifyFn):
        self.verify = verify
        self._done: list[tuple[int, VerdictRecord]] = []

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        for ticket, task, program in items:
            t0 = time.perf_counter()
            verdict = self.verify(task, program)
            record = VerdictRecord.from_verdict(verdict)
            if record.seconds == 0.0:
                record.seconds = round(time.perf_counter() - t0, 6)
            self._done.append((ticket, record))

    def poll(self, timeout: float = 0.0) -> list[tuple[int, VerdictRecord]]:
        out, self._done = self._done, []
        return out

    def pending(self) -> int:
        return len(self._done)


class PoolVerifier(VerifierBackend):
    """The benchmark's VerifierPool, fed batch by batch from a thread so the caller never blocks."""

    def __init__(self, pool: Any, own_pool: bool = True):
        self.pool = pool
        self.own_pool = own_pool
        self._inbox: "queue.Queue[Optional[list[tuple[int, str, str]]]]" = queue.Queue()
        self._outbox: "queue.Queue[Any]" = queue.Queue()
        self._pending = 0
        self._thread = threading.Thread(target=self._feed, name="stepforge-verify", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        while True:
            batch = self._inbox.get()
            if batch is None:
                return
            try:
                verdicts = self.pool.verify_many([(task, program) for _, task, program in batch])
                self._outbox.put([(t, VerdictRecord.from_verdict(v)) for (t, _, _), v in zip(batch, verdicts)])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller by poll()
                self._outbox.put(exc)

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        if items:
            self._pending += len(items)
            self._inbox.put(list(items))

    def poll(self, timeout: float = 0.0) -> list[tuple[int, VerdictRecord]]:
        out: list[tuple[int, VerdictRecord]] = []
        block = timeout > 0
        while True:
            try:
                got = self._outbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            if isinstance(got, BaseException):
                raise got
            out.extend(got)
            block = False
        self._pending -= len(out)
        return out

    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=2)
        # a batch still running holds the pool (after Ctrl-C): its daemon workers end with this process
        if self.own_pool and not self._thread.is_alive():
            self.pool.close()


class VerifierActor:
    """A Ray actor holding a warm verifier (the benchmark loaded once, caches kept)."""

    def __init__(self, verify_kwargs: dict[str, Any]):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        from stepforge.benchmark.schema import load_benchmark

        self.tasks = load_benchmark()
        self.verify_kwargs = dict(verify_kwargs)

    def ready(self) -> int:
        return os.getpid()

    def verify(self, task_key: str, program: str) -> dict:
        from stepforge.benchmark.verifier import verify

        return verify(self.tasks[task_key], program, **self.verify_kwargs).model_dump()


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any = None
    job: Optional[tuple[int, str, str]] = None
    ref: Any = None
    dispatched: float = 0.0


class RayVerifier(VerifierBackend):
    """`workers` Ray actors running verifications with a time limit each."""

    def __init__(self, workers: int, timeout_s: float, verify_kwargs: dict[str, Any], num_cpus: float = 1.0,
                 startup_timeout_s: float = 300.0):
        import ray

        self._ray = ray
        self.timeout_s = timeout_s
        self.verify_kwargs = dict(verify_kwargs)
        self.num_cpus = num_cpus
        self.startup_timeout_s = startup_timeout_s
        self._cls = ray.remote(max_restarts=0, max_task_retries=0)(VerifierActor)
        self._queue: list[tuple[int, str, str]] = []
        self._done: list[tuple[int, VerdictRecord]] = []
        self._pending = 0
        self.replacements = 0
        self._started = time.monotonic()
        self.slots = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Slot:
        actor = self._cls.options(num_cpus=self.num_cpus).remote(self.verify_kwargs)
        return _Slot(actor=actor, ready_ref=actor.ready.remote())

    def _replace(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        fresh = self._spawn()
        slot.actor, slot.ready_ref, slot.job, slot.ref = fresh.actor, fresh.ready_ref, None, None
        self.replacements += 1
        self._started = time.monotonic()

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        self._queue.extend(items)
        self._pending += len(items)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if self._queue and slot.ready_ref is None and slot.job is None:
                job = self._queue.pop(0)
                slot.job, slot.ref, slot.dispatched = job, slot.actor.verify.remote(job[1], job[2]), time.monotonic()

    def _fail(self, job: tuple[int, str, str], stage: str, message: str) -> tuple[int, VerdictRecord]:
        affine_ok = None
        try:
            from stepforge import simulator as sim

            affine_ok = not sim.check_affine(sim.parse_program(job[2]))
        except Exception:  # noqa: BLE001 - unparsable: unknown
            affine_ok = None
        return job[0], VerdictRecord(passed=False, stage=stage, message=message, affine_ok=affine_ok,
                                     functional_ok=False, seconds=0.0)

    def poll(self, timeout: float = 0.0) -> list[tuple[int, VerdictRecord]]:
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = [s.ready_ref for s in self.slots if s.ready_ref is not None]
        refs += [s.ref for s in self.slots if s.ref is not None]
        if refs:
            wait_s = timeout
            deadlines = [s.dispatched + self.timeout_s for s in self.slots if s.ref is not None]
            if deadlines:
                wait_s = max(0.0, min(wait_s, min(deadlines) - time.monotonic()))
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s) if wait_s == 0 else \
                ray.wait(refs, num_returns=1, timeout=wait_s)
            ready_set = set(ready)
            if wait_s > 0 and ready:  # gather everything else that is done too
                more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                ready_set.update(more)
            for slot in self.slots:
                if slot.ready_ref is not None and slot.ready_ref in ready_set:
                    try:
                        ray.get(slot.ready_ref)
                        slot.ready_ref = None
                    except (RayActorError, RayTaskError) as exc:
                        raise RuntimeError(f"a Ray verifier actor failed to start: {exc}") from None
                elif slot.ref is not None and slot.ref in ready_set:
                    job = slot.job
                    try:
                        verdict = ray.get(slot.ref)
                        from stepforge.benchmark.verifier import Verdict

                        self._done.append((job[0], VerdictRecord.from_verdict(Verdict.model_validate(verdict))))
                        slot.job, slot.ref = None, None
                    except RayTaskError as exc:
                        from stepforge.benchmark.schema import TaskFileError

                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, TaskFileError):
                            raise cause from None
                        self._done.append(self._fail(job, "runtime", f"the verifier failed: {cause or exc}"))
                        slot.job, slot.ref = None, None
                    except RayActorError:
                        self._done.append(self._fail(job, "runtime", "the verification crashed its worker"))
                        self._replace(slot)
        now = time.monotonic()
        for slot in self.slots:
            if slot.ref is not None and now - slot.dispatched > self.timeout_s:
                self._done.append(self._fail(slot.job, "timeout",
                                             f"verification exceeded the time limit of {self.timeout_s:g} s; "
                                             f"the worker was stopped"))
                self._replace(slot)
        if self._queue and all(s.ready_ref is not None for s in self.slots) \
                and now - self._started > self.startup_timeout_s:
            raise RuntimeError(f"no Ray verifier actor started within {self.startup_timeout_s:g} s "
                               f"(each asks for num_cpus={self.num_cpus:g}; is the cluster big enough?)")
        self._dispatch()
        out, self._done = self._done, []
        self._pending -= len(out)
        return out

    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        for slot in self.slots:
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.slots = []


# ---------------------------------------------------------------------------
# progress


class Events:
    """Callbacks of a running step (the default does nothing)."""

    def step_started(self, round_: int, step: int, demonstrations: Sequence[str], tasks: Sequence[str],
                     total: int, done: int, done_correct: int) -> None:
        pass

    def samples_recorded(self, records: Sequence[SampleRecord]) -> None:
        pass

    def step_finished(self, round_: int, step: int, solved: Sequence[str], unsolved: int) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress(Events):
    """A rich progress bar per step: samples, passes, tasks done, tokens/s."""

    def __init__(self, n_tasks: int, console: Any = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.n_tasks = n_tasks
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("pass {task.fields[passed]}"), TextColumn("tasks {task.fields[tasks]}"),
                                 TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.solved = 0
        self._bar = None
        self._tokens = 0
        self._t0 = time.monotonic()
        self._tasks_done: set[str] = set()
        self._by_task: dict[str, int] = {}
        self._per_task = 0

    def step_started(self, round_, step, demonstrations, tasks, total, done, done_correct) -> None:
        self._tokens, self._t0 = 0, time.monotonic()
        self._by_task = {}
        self._tasks_done = set()
        self._per_task = total // max(len(tasks), 1)
        self._bar = self.progress.add_task(f"round {round_} step {step} ({len(demonstrations)} demos)",
                                           total=total, completed=done, passed=done_correct,
                                           tasks=f"{self.solved}/{self.n_tasks}", tps="-")

    def samples_recorded(self, records) -> None:
        if self._bar is None:
            return
        self._tokens += sum(r.completion_tokens for r in records)
        rate = self._tokens / max(time.monotonic() - self._t0, 1e-6)
        passed = self.progress.tasks[-1].fields["passed"] + sum(1 for r in records if r.correct)
        self.progress.update(self._bar, advance=len(records), passed=passed, tps=f"{rate:.0f}")

    def step_finished(self, round_, step, solved, unsolved) -> None:
        self.solved += len(solved)
        if self._bar is not None:
            self.progress.update(self._bar, tasks=f"{self.solved}/{self.n_tasks}")
        self._bar = None

    def close(self) -> None:
        self.progress.stop()


class LogProgress(Events):
    """One line per step on stderr (for logs and non-terminals)."""

    def __init__(self, n_tasks: int, stream: Any = None):
        self.stream = stream or sys.stderr
        self.n_tasks = n_tasks
        self.solved = 0
        self._samples = self._correct = self._tokens = 0
        self._t0 = time.monotonic()

    def step_started(self, round_, step, demonstrations, tasks, total, done, done_correct) -> None:
        self._samples, self._correct, self._tokens, self._t0 = done, done_correct, 0, time.monotonic()
        print(f"round {round_} step {step}: {len(tasks)} tasks, {len(demonstrations)} demonstrations, "
              f"{total} samples ({done} already recorded)", file=self.stream, flush=True)

    def samples_recorded(self, records) -> None:
        self._samples += len(records)
        self._correct += sum(1 for r in records if r.correct)
        self._tokens += sum(r.completion_tokens for r in records)

    def step_finished(self, round_, step, solved, unsolved) -> None:
        self.solved += len(solved)
        secs = time.monotonic() - self._t0
        print(f"round {round_} step {step}: {self._samples} samples, {self._correct} correct, "
              f"solved {len(solved)} new ({self.solved}/{self.n_tasks}), {unsolved} unsolved, "
              f"{self._tokens / max(secs, 1e-6):.0f} tok/s, {secs:.1f} s", file=self.stream, flush=True)


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
    generate_s: float
    guard_s: float
    n_guarded: int


class Executor:
    """Generates, guards and verifies the jobs of one step with generation and verification overlapped."""

    def __init__(self, proposer: Proposer, guardian: Optional[Guardian], verifier: VerifierBackend, *,
                 extract: Optional[ExtractFn] = None, chunk_size: int = 8, guard_temperature: float = 0.0,
                 sink: Optional[Callable[[list[SampleRecord]], None]] = None,
                 prompt_sink: Optional[Callable[[dict[str, list[dict[str, str]]]], None]] = None,
                 events: Optional[Events] = None):
        self.proposer = proposer
        self.guardian = guardian
        self.verifier = verifier
        self.extract = extract or default_extract
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
        proposals = [list(p)[: j.n] for p, j in zip(proposals, jobs)]
        extracted = [[_extracted(self.extract(p.raw)) for p in props] for props in proposals]
        programs = [[prog for prog, _ in row] for row in extracted]
        reasons = [[why for _, why in row] for row in extracted]
        guarded: list[list[Optional[Any]]] = [[None] * len(props) for props in proposals]
        guard_s, n_guarded = 0.0, 0
        if self.guardian is not None:
            requests, where = [], []
            for a, (job, progs) in enumerate(zip(jobs, programs)):
                for b, prog in enumerate(progs):
                    if prog is not None and b not in job.skip:
                        requests.append(GuardRequest(task_key=job.task, task_ir=job.task_ir, program=prog,
                                                     temperature=self.guard_temperature,
                                                     seed=derive_seed(job.seed, b, "guard")))
                        where.append((a, b))
            if requests:
                t1 = time.perf_counter()
                results = self.guardian.repair(requests)
                guard_s = time.perf_counter() - t1
                if len(results) != len(requests):
                    raise RuntimeError(f"guardian returned {len(results)} results for {len(requests)} requests")
                for (a, b), res in zip(where, results):
                    guarded[a][b] = res
                n_guarded = len(requests)
        return _Generated(jobs, proposals, programs, reasons, guarded, generate_s, guard_s, n_guarded)

    # -- main thread ------------------------------------------------------
    def run(self, jobs: list[SampleJob]) -> list[SampleRecord]:
        """Every job's new samples (indices in `skip` left out), in job and index order."""
        if not jobs:
            return []
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
                        items.append((ticket, rec.task, rec.guarded))
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
        index = {(j.round, j.step, j.task, j.temperature): order[id(j)] for j in jobs}
        records.sort(key=lambda r: (index[(r.round, r.step, r.task, r.temperature)], r.index))
        return records

    def _records(self, gen: _Generated) -> list[SampleRecord]:
        """Sample records of a generated chunk, verdicts still to come (except extraction failures)."""
        out: list[SampleRecord] = []
        prompts: dict[str, list[dict[str, str]]] = {}
        n_props = sum(len(p) for p in gen.proposals) or 1
        now = time.time()
        for job, props, progs, whys, guards in zip(gen.jobs, gen.proposals, gen.programs, gen.reasons, gen.guarded):
            if not props:
                # nothing came back for this request (a prompt the model cannot take, a search that found
                # no program): its n samples are recorded as failures, so budgets and pass@k stay comparable
                errors = getattr(self.proposer, "last_errors", None) or {}
                why = errors.get(job.task) or f"the {getattr(self.proposer, 'name', 'proposer')} returned no proposal"
                for b in range(job.n):
                    if b not in job.skip:
                        out.append(SampleRecord(
                            round=job.round, step=job.step, task=job.task, temperature=job.temperature, index=b,
                            of=job.n, seed=job.seed, demonstrations=job.demo_keys, raw="",
                            verdict=VerdictRecord(passed=False, stage="generate", message=why),
                            timings={"generate_s": round(gen.generate_s / max(len(gen.jobs), 1) / job.n, 6),
                                     "guard_s": 0.0, "verify_s": 0.0}, time=now))
                continue
            for b, (prop, prog, why, guard) in enumerate(zip(props, progs, whys, guards)):
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
                if prog is None:
                    verdict = VerdictRecord(passed=False, stage="parse", message=why, affine_ok=None,
                                            functional_ok=False)
                else:
                    verdict = VerdictRecord(passed=False, stage="pending")
                out.append(SampleRecord(
                    round=job.round, step=job.step, task=job.task, temperature=job.temperature, index=b,
                    of=len(props), seed=job.seed, demonstrations=job.demo_keys, prompt_id=pid, raw=prop.raw,
                    program=prog, guarded=guarded if prog is not None else None, guard_changed=changed,
                    verdict=verdict, prompt_tokens=prop.prompt_tokens, completion_tokens=prop.completion_tokens,
                    guard_prompt_tokens=g_prompt, guard_completion_tokens=g_completion, timings=timings, time=now))
        if prompts and self.prompt_sink is not None:
            self.prompt_sink(prompts)
        return out

    def _collect(self, pending: dict[int, SampleRecord], records: list[SampleRecord], timeout: float) -> None:
        if not pending:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return
        done = self.verifier.poll(timeout)
        batch = []
        for ticket, verdict in done:
            rec = pending.pop(ticket)
            rec.verdict = verdict
            rec.verified = True
            rec.correct = verdict.passed
            rec.timings["verify_s"] = verdict.seconds
            rec.time = time.time()
            batch.append(rec)
        self._emit(batch, records)

    def _emit(self, batch: list[SampleRecord], records: list[SampleRecord]) -> None:
        if not batch:
            return
        if self.sink is not None:
            self.sink(batch)
        records.extend(batch)
        self.events.samples_recorded(batch)


__all__ = [
    "Events",
    "Executor",
    "InlineVerifier",
    "LogProgress",
    "PoolVerifier",
    "RayVerifier",
    "RichProgress",
    "SampleJob",
    "VerifierActor",
    "VerifierBackend",
    "default_extract",
    "derive_seed",
    "prompt_id",
]
