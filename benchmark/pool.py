"""Isolated verification: a pool of warm worker processes.

Task files carry Python (`global`, fn bodies, oracles) and candidate programs
are model output, so verification runs in worker processes, never in the
caller. Each worker imports torch and the simulator once and holds a
`WarmVerifier` (benchmark/warm.py): every task it was sent, and the verifier's
cached fns, inputs and oracle outputs, are kept across candidates. It
verifies one program at a time: no file is written and no interpreter is
started per candidate. A task's candidates go to a worker that already holds
the task when one is free (so each task is set up in few workers), and each
worker has up to `queue_depth` jobs queued, so it never waits on a round trip
to the caller. A verdict comes back as the Verdict's fields and nothing else.

    with VerifierPool(workers=2, timeout_s=10.0) as pool:
        v = pool.verify("norm/G_0_8_01", impl)                 # a benchmark key
        vs = pool.verify_many([(key, impl), (task, impl2)])    # a Task also works
        v = pool.verify(key, impl, timeout_s=30, seeds=(0,))    # per-call limit and verify() options
        v = pool.verify(key, candidate)                         # open mode: an OpenCandidate (fns + impl)

A verification that exceeds `timeout_s` (counted from when its worker starts
it: when it is sent to an idle worker, or when the worker's previous verdict
arrives) is killed with its worker, which is replaced; the verdict is
`timeout`, and the jobs queued behind it go to the other workers. A worker that dies (segfault, `os._exit`, out of memory) gives the
verdict `runtime` and is replaced; the caller never sees the crash. For both,
`affine_ok` is still filled in, by parsing the program in the caller (the
parser never runs program text). A broken task (its own code fails) raises
TaskFileError in the caller, as `verifier.verify` does in-process.

Workers are started with the `forkserver` method (torch and stepforge are
preloaded in the fork server, so a replacement worker is ready in well under
a second) where available, else `spawn`. The pool is thread-safe: calls from
several threads are served one batch at a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from stepforge.benchmark.open_mode import OpenCandidate
from stepforge.benchmark.schema import Task, TaskFileError, load_benchmark
from stepforge.benchmark.verifier import Verdict
from stepforge.errors import StepforgeError

TaskRef = Union[str, Task]
Impl = Union[None, str, OpenCandidate]  # a program (None: the reference), or an open candidate
DEFAULT_TIMEOUT_S = 10.0  # per verification
_PRELOAD = ["torch", "stepforge.simulator", "stepforge.benchmark.verifier", "stepforge.benchmark.warm"]
_LOOK_AHEAD = 64  # pending jobs scanned for one whose task a free worker already holds


# ---------------------------------------------------------------------------
# worker side


def _worker_main(conn, torch_threads: int) -> None:  # pragma: no cover - runs in the child
    try:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        from stepforge.benchmark.open_mode import OpenCandidate as _Open
        from stepforge.benchmark.schema import TaskFileError as _TFE
        from stepforge.benchmark.schema import task_from_dict
        from stepforge.benchmark.warm import WarmVerifier
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        return
    warm = WarmVerifier(tasks={})
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, job_id, key, payload, impl, kwargs = msg
        try:
            if payload is not None:  # the task as a mapping, and the file it came from (its errors name it)
                data, source = payload
                warm.add(key, task_from_dict(data, source=source))
            if isinstance(impl, tuple):  # ("open", the candidate as a mapping)
                impl = _Open.model_validate(impl[1])
            reply = ("verdict", job_id, warm.verify_dict(key, impl, **kwargs))
        except _TFE as exc:
            reply = ("task_error", job_id, (exc.path, exc.errors))
        except Exception as exc:
            reply = ("error", job_id, f"{type(exc).__name__}: {exc}")
        conn.send(reply)


# ---------------------------------------------------------------------------
# caller side


def pop_for_worker(pending: deque, known: set, key_of) -> Any:
    """Pop the first of `pending` whose task key (`key_of(item)`) a worker already holds (`known`),
    looking at most `_LOOK_AHEAD` items ahead, else the first: a task is set up in few workers."""
    for i, item in enumerate(pending):
        if i >= _LOOK_AHEAD:
            break
        if key_of(item) in known:
            del pending[i]
            return item
    return pending.popleft()

_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_not_reimported():
    """Start workers without re-running the caller's `__main__` in them.

    spawn/forkserver children normally re-import the parent's main script,
    which breaks (or re-runs) scripts that build a pool at top level without
    an `if __name__ == "__main__"` guard. The workers need nothing from
    `__main__` (their target lives in this module), so the main module's
    file and spec are hidden while a worker is started.
    """
    main = sys.modules.get("__main__")
    with _START_LOCK:
        saved = {}
        for attr in ("__file__", "__spec__"):
            if main is not None and hasattr(main, attr):
                saved[attr] = getattr(main, attr)
        try:
            if main is not None:
                if "__file__" in saved:
                    del main.__file__
                if "__spec__" in saved:
                    main.__spec__ = None
            yield
        finally:
            for attr, value in saved.items():
                setattr(main, attr, value)


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    jobs: deque = field(default_factory=deque)  # job indices sent, in the order the worker runs them
    deadline: float = 0.0  # of jobs[0], which runs from when the one before it finished
    limit: float = 0.0
    started: float = field(default_factory=time.monotonic)
    known: set = field(default_factory=set)  # task keys this worker holds

    @property
    def job(self) -> Optional[int]:
        """The job the worker is running now (None when idle)."""
        return self.jobs[0] if self.jobs else None


class PoolError(StepforgeError):
    """The pool itself cannot work (workers fail to start)."""


def _default_context(start_method: Optional[str]):
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class VerifierPool:
    """Warm worker processes that run `verifier.verify` with a time limit.

    `tasks`: the tasks known by key (default: `load_benchmark(root)`). Jobs
    may also pass a Task object, known or not. `verify_kwargs` are passed to
    every `verify` call (seeds, bindings, engine, check_affine, max_elements,
    cache); per-call keyword arguments override them. `queue_depth`: jobs
    sent to a worker ahead of its verdicts (2: the next job is already there
    when one finishes, so no worker waits for a round trip).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tasks: Optional[dict[str, Task]] = None,
        root: Optional[Union[str, Path]] = None,
        start_method: Optional[str] = None,
        torch_threads: int = 1,
        startup_timeout_s: float = 120.0,
        verify_kwargs: Optional[dict] = None,
        queue_depth: int = 2,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.timeout_s = float(timeout_s)
        self.n_workers = int(workers)
        self.tasks: dict[str, Task] = dict(tasks) if tasks is not None else load_benchmark(root)
        self.verify_kwargs = dict(verify_kwargs or {})
        self._ctx = _default_context(start_method)
        self._torch_threads = torch_threads
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._failed_starts = 0
        self._pending: Optional[deque] = None
        self.depth = max(1, int(queue_depth))
        self.restarts = 0
        for _ in range(self.n_workers):
            self._workers.append(self._start_worker())

    # -- lifecycle ----------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self._torch_threads), daemon=True,
                                 name="stepforge-verifier")
        with _main_not_reimported():
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        try:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(timeout=5)
        except Exception:
            pass
        try:
            w.conn.close()
        except Exception:
            pass

    def _replace(self, w: _Worker) -> _Worker:
        self._kill(w)
        self.restarts += 1
        new = self._start_worker()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                try:
                    w.conn.send(("stop",))
                except Exception:
                    pass
            for w in self._workers:
                w.process.join(timeout=2)
                self._kill(w)
            self._workers = []

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        """Block until every worker has started (optional; jobs wait for it anyway)."""
        with self._lock:
            deadline = time.monotonic() + (timeout_s or self._startup_timeout_s)
            while not all(w.ready for w in self._workers):
                self._poll(max(0.0, deadline - time.monotonic()), results=None, jobs=None)
                if time.monotonic() > deadline:
                    raise PoolError("verifier workers did not start in time")

    # -- jobs ---------------------------------------------------------------
    def _task_key(self, task: TaskRef) -> tuple[str, Task]:
        if isinstance(task, Task):
            key = f"{task.key}#{task.fingerprint()}"
            return key, task
        if task not in self.tasks:
            raise KeyError(f"no task {task!r} in this pool (it knows {len(self.tasks)} tasks)")
        return task, self.tasks[task]

    def verify(self, task: TaskRef, impl: Impl = None, *, timeout_s: Optional[float] = None,
               **kwargs) -> Verdict:
        """Verify one program (default: the task's reference impl) or open candidate in a worker."""
        return self.verify_many([(task, impl)], timeout_s=timeout_s, **kwargs)[0]

    def verify_many(self, jobs: Sequence[tuple[TaskRef, Impl]], *, timeout_s: Optional[float] = None,
                    **kwargs) -> list[Verdict]:
        """Verify many programs in parallel over the workers; verdicts in job order.

        `timeout_s` overrides the pool's limit per verification for this call;
        other keyword arguments go to `verifier.verify` (over `verify_kwargs`).
        """
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        resolved = []
        keys_of: dict[int, tuple[str, Task]] = {}  # one fingerprint per Task object in this call
        for task, impl in jobs:
            if id(task) not in keys_of or keys_of[id(task)][1] is not task:
                keys_of[id(task)] = self._task_key(task)
            key, task_obj = keys_of[id(task)]
            if impl is None:
                if not task_obj.impl:
                    raise ValueError(f"task {task_obj.key} has no reference impl; pass the program to verify")
                impl = task_obj.impl
            resolved.append((key, task_obj, impl))
        call_kwargs = {**self.verify_kwargs, **kwargs}
        with self._lock:
            if self._closed:
                raise PoolError("the pool is closed")
            results: list[Optional[Verdict]] = [None] * len(resolved)
            self._task_errors: list[TaskFileError] = []
            self._pending = deque(range(len(resolved)))
            while self._pending or any(w.jobs for w in self._workers):
                for w in self._workers:
                    while self._pending and w.ready and len(w.jobs) < self.depth:
                        self._dispatch(w, self._next_job_for(w, resolved), resolved, call_kwargs, limit)
                self._poll(self._next_timeout(), results, resolved)
            if self._task_errors:
                raise self._task_errors[0]
            return [r for r in results]  # every slot is filled by now

    def _next_job_for(self, w: _Worker, resolved) -> int:
        """The first pending job whose task `w` already holds (within a look-ahead), else the first."""
        return pop_for_worker(self._pending, w.known, lambda idx: resolved[idx][0])

    def _dispatch(self, w: _Worker, idx: int, resolved, kwargs, limit: float) -> None:
        key, task, impl = resolved[idx]
        payload = None if key in w.known else (task.model_dump(mode="python", by_alias=True), task.source)
        if isinstance(impl, OpenCandidate):
            impl = ("open", impl.model_dump())
        if not w.jobs:
            w.deadline = time.monotonic() + limit
        w.jobs.append(idx)
        w.limit = limit
        try:
            w.conn.send(("job", idx, key, payload, impl, kwargs))
            w.known.add(key)
        except (OSError, EOFError, BrokenPipeError):
            pass  # the worker died; _poll sees it and answers the job

    def _requeue(self, w: _Worker) -> None:
        """Put the jobs a lost worker had queued behind its current one back in front of the queue."""
        queued = list(w.jobs)[1:]
        w.jobs.clear()
        if self._pending is not None:
            self._pending.extendleft(reversed(queued))

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.jobs]
        deadlines += [w.started + self._startup_timeout_s for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - now) if deadlines else 0.05

    def _poll(self, timeout: float, results, jobs) -> None:
        by_obj = {}
        for w in self._workers:
            by_obj[w.conn] = w
            by_obj[w.process.sentinel] = w
        ready = mp_wait(list(by_obj), timeout=timeout)
        handled = set()
        for obj in ready:
            w = by_obj[obj]
            if id(w) in handled:
                continue
            handled.add(id(w))
            self._service(w, results, jobs)
        now = time.monotonic()
        for w in list(self._workers):
            if w.jobs and now > w.deadline and results is not None:
                idx = w.jobs[0]
                results[idx] = self._failure(jobs[idx], "timeout",
                                             f"verification exceeded the time limit of {w.limit:g} s; "
                                             f"the worker was stopped")
                self._requeue(w)
                self._replace(w)
            elif not w.ready and now > w.started + self._startup_timeout_s:
                self._kill(w)
                raise PoolError(f"a verifier worker did not start within {self._startup_timeout_s:g} s")

    def _service(self, w: _Worker, results, jobs) -> None:
        """Read what a worker sent, or notice that it died."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                self._handle(w, msg, results, jobs)
        except (EOFError, OSError, ValueError):
            pass
        except Exception:  # an unreadable message (the worker died while sending)
            pass
        if not w.process.is_alive():
            w.process.join(timeout=1)
            code = w.process.exitcode
            if w.jobs and results is not None:
                idx = w.jobs[0]
                results[idx] = self._failure(jobs[idx], "runtime",
                                             f"the verification crashed its worker process (exit code {code})")
            self._requeue(w)
            if not w.ready:
                self._failed_starts += 1
                if self._failed_starts >= 3:
                    raise PoolError(f"verifier workers keep dying at start (exit code {code})")
            self._replace(w)

    def _handle(self, w: _Worker, msg, results, jobs) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            self._failed_starts = 0
            return
        if kind == "fatal":
            raise PoolError(f"a verifier worker failed to start:\n{msg[1]}")
        idx = msg[1]
        if w.job != idx or results is None:
            return
        w.jobs.popleft()
        w.deadline = time.monotonic() + w.limit  # the next queued job starts now
        if kind == "verdict":
            results[idx] = Verdict.model_validate(msg[2])
        elif kind == "task_error":
            path, errors = msg[2]
            self._task_errors.append(TaskFileError(path, [tuple(e) for e in errors]))
            results[idx] = self._failure(jobs[idx], "runtime", "the task itself is broken: " + errors[0][1])
        else:
            results[idx] = self._failure(jobs[idx], "runtime", f"the verifier failed: {msg[2]}")

    def _failure(self, job, stage: str, message: str) -> Verdict:
        key, task, impl = job
        affine_ok = None
        try:
            from stepforge import simulator as sim

            affine_ok = not sim.check_affine(sim.parse_program(impl.impl if isinstance(impl, OpenCandidate) else impl))
        except Exception:
            affine_ok = None
        return Verdict(passed=False, stage=stage, message=message, task=task.key, affine_ok=affine_ok,
                       functional_ok=False)


__all__ = ["DEFAULT_TIMEOUT_S", "PoolError", "VerifierPool"]
