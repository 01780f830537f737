"""Schedules requests arriving concurrently (e.g. from HTTP handlers) fairly
onto one backend, on a single worker thread.

Local engines are not thread-safe and are fastest on big batches. Callers
submit their requests and get a future. Each request is split into *units*,
the pieces the worker can schedule and stop between: a sampled request
(temperature > 0, no seed) gives one unit per sample, while a seeded or greedy
request stays one unit (its n samples come from one seeded RNG stream, or are
one decode repeated).

Each `backend.generate` call is *led* by the submission at the head of a
round-robin ring; it holds that submission's units plus, round-robin, units of
other waiting submissions that are no more expensive (max_tokens at most the
leader's), up to `max_batch` units. The leader rejoins the ring at the back
when its batch finishes, behind anything that arrived meanwhile. So every
submission leads a batch once per turn of the ring (no starvation), and a
small request arriving while a huge one runs leads the very next batch, which
the huge one's costlier units do not stretch.

At most `max_queued` units wait at once; a submission that would exceed it
is refused. Cancelling a future (its client left) drops its queued units; `close` fails
every unfinished future and stops the worker after the batch in progress.
If a merged batch fails, each submission's units are retried alone, so one
bad request only fails its own caller.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from .base import Completion, GenerationRequest, GenerationResult, ModelBackend
from .errors import BackendUnavailableError, GenerationError


@dataclass
class _Unit:
    job: _Job
    index: int  # the request's position in its submission
    first: int  # the first sample slot it fills
    request: GenerationRequest


def split_request(request: GenerationRequest) -> list[tuple[int, GenerationRequest]]:
    """(first sample slot, unit request) pairs that together sample `request`."""
    s = request.sampling
    if s.n == 1 or s.seed is not None or s.temperature == 0:
        return [(0, request)]
    one = request.model_copy(update={"sampling": s.model_copy(update={"n": 1})})
    return [(k, one) for k in range(s.n)]


class _Job:
    """One submission: its units still to run, and the results gathered so far."""

    def __init__(self, requests: list[GenerationRequest]):
        self.requests = requests
        self.future: Future = Future()
        self.pending: deque[_Unit] = deque(
            _Unit(self, i, first, unit) for i, r in enumerate(requests) for first, unit in split_request(r)
        )
        self.outstanding = len(self.pending)
        self.prompt_tokens: list[int] = [0] * len(requests)
        self.samples: list[list[Completion | None]] = [[None] * r.sampling.n for r in requests]

    def results(self) -> list[GenerationResult]:
        return [
            GenerationResult(request_id=r.request_id, prompt_tokens=p, completions=list(c))
            for r, p, c in zip(self.requests, self.prompt_tokens, self.samples)
        ]


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it is already done (e.g. cancelled meanwhile)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class RequestBatcher:
    """Single-threaded, round-robin front of a backend."""

    def __init__(self, backend: ModelBackend, max_batch: int = 64, max_wait_s: float = 0.005,
                 max_queued: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.backend = backend
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self.batches_run = 0
        self.units_run = 0
        self._cond = threading.Condition(threading.RLock())
        self._ready: deque[_Job] = deque()  # jobs with queued units, in round-robin order
        self._leader: _Job | None = None  # the job leading the batch in progress, out of the ring
        self._live: set[_Job] = set()  # jobs not yet resolved
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="request-batcher", daemon=True)
        self._thread.start()

    def submit(self, requests: list[GenerationRequest]) -> Future:
        """Queue requests; the future resolves to their results, in order.
        Cancelling the future drops the units not yet started. Raises
        BackendUnavailableError when closing, or when the units would take
        the queue past `max_queued`."""
        job = _Job(list(requests))
        with self._cond:
            if self._closing:
                raise BackendUnavailableError("the server is shutting down")
            if self.max_queued is not None and self.queued_units() + len(job.pending) > self.max_queued:
                raise BackendUnavailableError(f"the server is busy ({self.queued_units()} units queued); retry later")
            if not job.pending:
                job.future.set_result([])
                return job.future
            self._live.add(job)
            self._ready.append(job)
            self._cond.notify_all()
        job.future.add_done_callback(lambda f, job=job: self._forget(job) if f.cancelled() else None)
        return job.future

    def queued_units(self) -> int:
        """Units waiting to run (not counting the batch in progress)."""
        with self._cond:
            leader = len(self._leader.pending) if self._leader is not None else 0
            return leader + sum(len(job.pending) for job in self._ready)

    def _forget(self, job: _Job) -> None:
        with self._cond:
            job.pending.clear()
            self._live.discard(job)
            if job in self._ready:
                self._ready.remove(job)

    def _next_batch(self) -> list[_Unit] | None:
        with self._cond:
            while not self._ready and not self._closing:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._closing and self.queued_units() < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closing:
                return None
            return self._lead_batch()

    def _lead_batch(self) -> list[_Unit]:
        """The next batch, led by the ring's head (called with the lock held)."""
        leader = self._leader = self._ready.popleft()
        cost = leader.pending[0].request.sampling.max_tokens
        batch = [leader.pending.popleft()]
        while len(batch) < self.max_batch:
            eligible = [job for job in (*self._ready, leader) if job.pending and job.pending[0].request.sampling.max_tokens <= cost]
            if not eligible:
                break
            for job in eligible[: self.max_batch - len(batch)]:
                batch.append(job.pending.popleft())
        for job in [job for job in self._ready if not job.pending]:
            self._ready.remove(job)
        return batch

    def _rejoin(self) -> None:
        """Put the leader of the finished batch back at the end of the ring."""
        with self._cond:
            leader, self._leader = self._leader, None
            if leader is not None and leader.pending:
                self._ready.append(leader)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)
            self._rejoin()

    def _execute(self, batch: list[_Unit]) -> None:
        self.batches_run += 1
        self.units_run += len(batch)
        try:
            results = self.backend.generate([u.request for u in batch])
            if len(results) != len(batch):
                raise GenerationError(f"backend returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 - delivered to the callers
            jobs = list(dict.fromkeys(u.job for u in batch))
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return
            for job in jobs:
                self._execute([u for u in batch if u.job is job])
            return
        for unit, result in zip(batch, results):
            self._deliver(unit, result)

    def _deliver(self, unit: _Unit, result: GenerationResult) -> None:
        job = unit.job
        n = unit.request.sampling.n
        if len(result.completions) != n:
            self._fail(job, GenerationError(f"backend returned {len(result.completions)} completions, expected {n}"))
            return
        with self._cond:
            if job not in self._live:
                return
            job.prompt_tokens[unit.index] = result.prompt_tokens
            job.samples[unit.index][unit.first : unit.first + n] = result.completions
            job.outstanding -= 1
            finished = job.outstanding == 0
            if finished:
                self._live.discard(job)
        if finished:
            _settle(job.future, job.results())

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._forget(job)
        _settle(job.future, error=error)

    def close(self, timeout: float = 10.0) -> bool:
        """Fail unfinished submissions and stop the worker once its current
        batch (if any) returns, waiting at most `timeout` seconds. True when
        the worker has stopped."""
        with self._cond:
            self._closing = True
            jobs = list(self._live)
            self._cond.notify_all()
        for job in jobs:
            self._fail(job, BackendUnavailableError("the server is shutting down"))
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()
