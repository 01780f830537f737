"""A warm verifier: the object a verification worker holds (pool workers, Ray actors).

It keeps the tasks it was given or loaded, by key, and calls `verifier.verify`,
whose process-wide cache (benchmark/cache.py) keeps each task's fns, inputs
and oracle outputs across candidates. A worker therefore pays a task's setup
once, and each candidate costs only its own parse, type checks and runs.

    warm = WarmVerifier(verify_kwargs={"seeds": (0, 1, 2)})   # the benchmark, loaded once
    verdict = warm.verify("norm/G_0_8_01", program)           # a Verdict
    record = warm.verify_dict("norm/G_0_8_01", program)       # the same as a plain dict (Ray, pipes)
    verdict = warm.verify("norm/G_0_8_01", candidate)         # open mode: an OpenCandidate (fns + impl)

An open candidate is verified with the same caches as a program (the task's
inputs, oracles and tolerances per binding and seed); its interpreted fns are
built once per binding of the verification.

Tasks loaded from the benchmark folder are re-read when their file changes
(its modification time or size): the new content has a new fingerprint, so
nothing cached for the old one is used. Tasks added with `add` are kept as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from stepforge.benchmark.open_mode import OpenCandidate, verify_open
from stepforge.benchmark.schema import TASKS_ROOT, Task, load_benchmark, load_task
from stepforge.benchmark.verifier import Verdict, cache_stats, verify


class WarmVerifier:
    """Tasks by key plus the verifier's warm caches; see the module docstring.

    `tasks`: the tasks known by key (default: every task under `root`, the
    benchmark folder by default). `verify_kwargs` go to every `verify` call;
    per-call keyword arguments override them. Not thread-safe on its own
    (`verify` serialises calls in a process anyway).
    """

    def __init__(self, tasks: Optional[dict[str, Task]] = None, *, root: Optional[Union[str, Path]] = None,
                 verify_kwargs: Optional[dict[str, Any]] = None):
        self.root = Path(root) if root is not None else TASKS_ROOT
        self.verify_kwargs = dict(verify_kwargs or {})
        self._tasks: dict[str, Task] = {}
        self._files: dict[str, tuple[Path, tuple[int, int]]] = {}  # key -> (file, (mtime_ns, size))
        if tasks is None:
            for key, task in load_benchmark(self.root).items():
                self._tasks[key] = task
                path = self.root / f"{key}.yaml"
                if path.is_file():
                    self._files[key] = (path, _signature(path))
        else:
            self._tasks.update(tasks)

    def add(self, key: str, task: Task) -> None:
        """Know `task` as `key` (replacing any task of that key)."""
        self._tasks[key] = task
        self._files.pop(key, None)

    def knows(self, key: str) -> bool:
        return key in self._tasks

    def task(self, key: str) -> Task:
        """The task of `key`, re-read first if its file changed; KeyError if unknown."""
        if key not in self._tasks:
            raise KeyError(f"no task {key!r} (this verifier knows {len(self._tasks)} tasks)")
        if key in self._files:
            path, sig = self._files[key]
            try:
                now = _signature(path)
            except OSError:
                now = sig  # the file went away: keep verifying the task as loaded
            if now != sig:
                task = load_task(path)
                if task.group is None:  # as load_benchmark names it
                    task = task.model_copy(update={"group": path.parent.name})
                self._tasks[key] = task
                self._files[key] = (path, now)
        return self._tasks[key]

    def verify(self, task: Union[str, Task], impl: Union[None, str, OpenCandidate] = None, **kwargs) -> Verdict:
        """Verify `impl` against a task given by key or as a Task.

        `impl`: a program (default: the reference), or an OpenCandidate (open mode).
        """
        task_obj = task if isinstance(task, Task) else self.task(task)
        if isinstance(impl, OpenCandidate):
            return verify_open(task_obj, impl, **{**self.verify_kwargs, **kwargs})
        return verify(task_obj, impl, **{**self.verify_kwargs, **kwargs})

    def verify_dict(self, task: Union[str, Task], impl: Union[None, str, OpenCandidate] = None, **kwargs) -> dict:
        """`verify(...)` as a plain dict (`Verdict.model_validate` reads it back)."""
        return self.verify(task, impl, **kwargs).model_dump()

    def stats(self) -> dict[str, int]:
        """Tasks known, and the verifier cache's entries, bytes, hits, misses and evictions."""
        return {"tasks": len(self._tasks), **cache_stats()}


def _signature(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


__all__ = ["WarmVerifier"]
