"""Verifier backends of the executor: submit (ticket, task key, program) items, poll for verdicts.

- `InlineVerifier`: a verify function called in this process (tests,
  debugging; no time limit).
- `PoolVerifier`: the benchmark's `VerifierPool` (warm worker processes, a
  time limit per verification, a worker that exceeds it is replaced).
- `RayVerifier`: Ray actors each holding a warm verifier, one verification
  in flight per actor, a task's candidates sent to an actor that already
  holds the task when one is free; one that exceeds `timeout_s` is killed and replaced
  and the candidate is scored `timeout`; one that dies is replaced and the
  candidate scored `runtime`.

`VERIFIERS` names them for the config's `verifier.kind`.

An item is `(ticket, task key, candidate text)` or `(ticket, task key,
candidate text, mode)`: in mode `open` the text is an open candidate (fns +
impl YAML, docs/language.md section 5a), verified with its own fns; a closed item may leave
the mode out.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from stepforge.benchmark.pool import pop_for_worker
from stepforge.benchmark.verdict import Verdict, failed
from stepforge.registry import Registry

VerifyFn = Callable[..., Any]  # (task key, program) -> a Verdict; open items: (task key, candidate, "open")


def unpack_item(item: tuple) -> tuple[int, str, str, str]:
    """(ticket, task key, text, mode) of a 3- or 4-tuple item (mode `closed` when left out)."""
    ticket, task, text, *rest = item
    return ticket, task, text, (rest[0] if rest else "closed")


def _open_impl(text: str) -> Any:
    """The open candidate of `text` for the verifier pool, or a `fns` verdict if it is malformed."""
    from stepforge.benchmark.open_mode import CandidateError, load_candidate

    try:
        return load_candidate(text)
    except CandidateError as exc:
        return failed("fns", str(exc))


class VerifierBackend(ABC):
    """Asynchronous verification: submit (ticket, task key, program) items, poll for verdicts."""

    @abstractmethod
    def submit(self, items: list[tuple[int, str, str]]) -> None:
        """Queue items for verification."""

    @abstractmethod
    def poll(self, timeout: float = 0.0) -> list[tuple[int, Verdict]]:
        """Verdicts finished so far (waiting up to `timeout` seconds for the first one)."""

    @abstractmethod
    def pending(self) -> int:
        """Items submitted and not yet returned by poll."""

    def close(self) -> None:  # noqa: B027 - optional: backends without workers hold nothing
        """Release workers."""


class InlineVerifier(VerifierBackend):
    """Verifies in this process, at submit time (no time limit)."""

    def __init__(self, verify: VerifyFn):
        self.verify = verify
        self._done: list[tuple[int, Verdict]] = []

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        for item in items:
            ticket, task, program, mode = unpack_item(item)
            t0 = time.perf_counter()
            verdict = self.verify(task, program) if mode == "closed" else self.verify(task, program, mode)
            own = verdict.seconds or verdict.timings.get("total", 0.0)
            self._done.append((ticket, verdict.timed(own or time.perf_counter() - t0)))

    def poll(self, timeout: float = 0.0) -> list[tuple[int, Verdict]]:
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
                items = [unpack_item(item) for item in batch]
                impls = [(task, _open_impl(text) if mode == "open" else text) for _, task, text, mode in items]
                ready = [i for i, (_, impl) in enumerate(impls) if not isinstance(impl, Verdict)]
                verdicts = dict(zip(ready, self.pool.verify_many([impls[i] for i in ready]))) if ready else {}
                self._outbox.put([(item[0], (verdicts[i] if i in verdicts else impls[i][1]).timed())
                                  for i, item in enumerate(items)])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller by poll()
                self._outbox.put(exc)

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        if items:
            self._pending += len(items)
            self._inbox.put(list(items))

    def poll(self, timeout: float = 0.0) -> list[tuple[int, Verdict]]:
        out: list[tuple[int, Verdict]] = []
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
    """A Ray actor holding a warm verifier (benchmark/warm.py: the benchmark loaded once, each
    task's fns, inputs and oracle outputs cached across candidates)."""

    def __init__(self, verify_kwargs: dict[str, Any]):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        from stepforge.benchmark.warm import WarmVerifier

        self.warm = WarmVerifier(verify_kwargs=verify_kwargs)

    def ready(self) -> int:
        return os.getpid()

    def verify(self, task_key: str, program: str, mode: str = "closed") -> dict:
        impl = _open_impl(program) if mode == "open" else program
        return impl.model_dump() if isinstance(impl, Verdict) else self.warm.verify_dict(task_key, impl)


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any = None
    job: Optional[tuple[int, str, str, str]] = None
    ref: Any = None
    dispatched: float = 0.0
    known: set = field(default_factory=set)  # task keys this actor has set up


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
        self._queue: deque[tuple[int, str, str, str]] = deque()
        self._done: list[tuple[int, Verdict]] = []
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
        slot.actor, slot.ready_ref, slot.job, slot.ref, slot.known = fresh.actor, fresh.ready_ref, None, None, set()
        self.replacements += 1
        self._started = time.monotonic()

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        self._queue.extend(unpack_item(item) for item in items)
        self._pending += len(items)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if self._queue and slot.ready_ref is None and slot.job is None:
                job = pop_for_worker(self._queue, slot.known, lambda item: item[1])
                slot.job, slot.ref, slot.dispatched = job, slot.actor.verify.remote(job[1], job[2], job[3]), \
                    time.monotonic()
                slot.known.add(job[1])

    def _fail(self, job: tuple[int, str, str, str], stage: str, message: str) -> tuple[int, Verdict]:
        affine_ok = None
        try:
            from stepforge import simulator as sim
            from stepforge.loop.candidates import candidate_impl

            affine_ok = not sim.check_affine(sim.parse_program(candidate_impl(job[2])))
        except Exception:  # noqa: BLE001 - unparsable: unknown
            affine_ok = None
        return job[0], failed(stage, message, affine_ok=affine_ok)

    def poll(self, timeout: float = 0.0) -> list[tuple[int, Verdict]]:
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
                        self._done.append((job[0], Verdict.model_validate(verdict).timed()))
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


VERIFIERS: Registry[type[VerifierBackend]] = Registry("verifier kind", {
    "inline": InlineVerifier, "pool": PoolVerifier, "ray": RayVerifier})
