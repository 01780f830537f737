"""Gathers requests arriving concurrently (e.g. from HTTP handlers) into
batches for one backend, on a single worker thread.

Local engines are not thread-safe and are fastest on big batches: callers
submit their requests and get a future; the worker takes whatever is queued
(up to `max_batch` requests, waiting at most `max_wait_s` for more) and runs
one `backend.generate` call. If a merged batch fails, each caller's requests
are retried alone, so one bad request only fails its own caller.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .base import GenerationRequest, ModelBackend


@dataclass
class _Item:
    requests: list[GenerationRequest]
    future: Future = field(default_factory=Future)


class RequestBatcher:
    """Single-threaded front of a backend that merges concurrent submissions."""

    def __init__(self, backend: ModelBackend, max_batch: int = 64, max_wait_s: float = 0.005):
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches_run = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="request-batcher", daemon=True)
        self._thread.start()

    def submit(self, requests: list[GenerationRequest]) -> Future:
        """Queue requests; the future resolves to their results, in order."""
        item = _Item(list(requests))
        self._queue.put(item)
        return item.future

    def _take_batch(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, size = [first], len(first.requests)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
            size += len(nxt.requests)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._take_batch(first)
            self._execute(batch)

    def _execute(self, batch: list[_Item]) -> None:
        flat = [r for item in batch for r in item.requests]
        self.batches_run += 1
        try:
            results = self.backend.generate(flat)
        except BaseException as exc:  # noqa: BLE001 - delivered to the callers
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for item in batch:
                self._execute([item])
            return
        start = 0
        for item in batch:
            item.future.set_result(results[start : start + len(item.requests)])
            start += len(item.requests)

    def close(self) -> None:
        """Finish queued work and stop the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout=60)
