"""The request batcher merges concurrent submissions and isolates failures."""

from __future__ import annotations

import threading
import time

import pytest

from stepforge.serve.base import (
    Completion,
    GenerationRequest,
    GenerationResult,
    ModelBackend,
    SamplingParams,
)
from stepforge.serve.batcher import RequestBatcher
from stepforge.serve.errors import (
    BackendUnavailableError,
    GenerationError,
    PromptTooLongError,
)


class EchoBackend(ModelBackend):
    """Echoes prompts; refuses prompts containing 'BAD'; records batch sizes."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[int] = []
        self.gate = gate

    def generate(self, requests):
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(requests))
        if any("BAD" in r.prompt for r in requests):
            raise PromptTooLongError("BAD prompt")
        return [GenerationResult(request_id=r.request_id, prompt_tokens=len(r.prompt),
                                 completions=[Completion(text=r.prompt.upper(), finish_reason="stop", completion_tokens=1)])
                for r in requests]

    def count_tokens(self, text):
        return len(text)


def reqs(*prompts):
    return [GenerationRequest(prompt=p, request_id=p) for p in prompts]


def test_concurrent_submissions_share_a_batch_and_keep_order():
    gate = threading.Event()
    backend = EchoBackend(gate)
    batcher = RequestBatcher(backend, max_batch=64, max_wait_s=0.05)
    first = batcher.submit(reqs("a"))  # blocks the worker until the gate opens
    later = [batcher.submit(reqs(f"x{i}", f"y{i}")) for i in range(5)]
    gate.set()
    assert [r.texts for r in first.result(5)] == [["A"]]
    for i, fut in enumerate(later):
        assert [r.request_id for r in fut.result(5)] == [f"x{i}", f"y{i}"]
    assert sum(backend.batches) == 11 and len(backend.batches) < 6
    batcher.close()


def test_a_failing_request_only_fails_its_caller():
    gate = threading.Event()
    backend = EchoBackend(gate)
    batcher = RequestBatcher(backend, max_wait_s=0.05)
    blocker = batcher.submit(reqs("a"))
    good, bad = batcher.submit(reqs("ok")), batcher.submit(reqs("BAD"))
    gate.set()
    blocker.result(5)
    assert good.result(5)[0].texts == ["OK"]
    with pytest.raises(PromptTooLongError):
        bad.result(5)
    batcher.close()


def test_max_batch_is_respected():
    gate = threading.Event()
    backend = EchoBackend(gate)
    batcher = RequestBatcher(backend, max_batch=3, max_wait_s=0.05)
    futs = [batcher.submit(reqs(str(i))) for i in range(7)]
    gate.set()
    assert [f.result(5)[0].texts for f in futs] == [[str(i)] for i in range(7)]
    assert max(backend.batches) <= 3
    batcher.close()


class SampleBackend(EchoBackend):
    """Like EchoBackend, but numbers each sample it draws (`text` = prompt:k)."""

    def __init__(self, gate=None):
        super().__init__(gate)
        self.drawn = 0
        self.seen: list[GenerationRequest] = []

    def generate(self, requests):
        if self.gate is not None:
            self.gate.wait(5)
        self.seen.extend(requests)
        out = []
        for r in requests:
            comps = []
            for _ in range(r.sampling.n):
                comps.append(Completion(text=f"{r.prompt}:{self.drawn}", finish_reason="length", completion_tokens=2))
                self.drawn += 1
            out.append(GenerationResult(request_id=r.request_id, prompt_tokens=len(r.prompt), completions=comps))
        return out


def wait_taken(batcher: RequestBatcher) -> None:
    """Wait (at most 5 s) until the worker has taken everything queued."""
    deadline = time.monotonic() + 5
    while batcher.queued_units():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def sampled(prompt, n, **kw):
    return GenerationRequest(prompt=prompt, request_id=prompt, sampling=SamplingParams(n=n, **kw))


def test_sampled_requests_run_as_one_unit_per_sample_and_reassemble_in_order():
    backend = SampleBackend()
    batcher = RequestBatcher(backend, max_batch=2, max_wait_s=0.05)
    results = batcher.submit([sampled("a", 3, temperature=1.0), sampled("s", 4, seed=7), sampled("g", 2, temperature=0)]).result(5)
    assert [(r.request_id, len(r.completions), r.prompt_tokens) for r in results] == [("a", 3, 1), ("s", 4, 1), ("g", 2, 1)]
    assert [c.text for c in results[0].completions] == sorted(c.text for c in results[0].completions)  # slot order kept
    # 3 one-sample units for "a"; the seeded and the greedy request each stay whole
    assert sorted((r.prompt, r.sampling.n) for r in backend.seen) == [("a", 1)] * 3 + [("g", 2), ("s", 4)]
    assert batcher.units_run == 5 and batcher.batches_run == 3
    batcher.close()


def test_cancelling_a_submission_drops_its_queued_units():
    gate = threading.Event()
    backend = SampleBackend(gate)
    batcher = RequestBatcher(backend, max_batch=1, max_wait_s=0.01)
    first = batcher.submit([sampled("a", 1)])  # holds the worker at the gate
    wait_taken(batcher)
    big = batcher.submit([sampled("big", 6, temperature=1.0)])
    assert batcher.queued_units() == 6
    assert big.cancel() and batcher.queued_units() == 0
    last = batcher.submit([sampled("z", 1)])
    gate.set()
    assert last.result(5)[0].texts == ["z:1"] and first.result(5)[0].texts == ["a:0"]
    assert [r.prompt for r in backend.seen] == ["a", "z"]
    batcher.close()


def test_close_fails_unfinished_submissions_and_refuses_new_ones():
    gate = threading.Event()
    backend = SampleBackend(gate)
    batcher = RequestBatcher(backend, max_batch=1, max_wait_s=0.01)
    running = batcher.submit([sampled("a", 1)])
    wait_taken(batcher)
    queued = batcher.submit([sampled("b", 3, temperature=1.0)])
    closer = threading.Thread(target=batcher.close, args=(5,))
    closer.start()
    with pytest.raises(BackendUnavailableError, match="shutting down"):
        queued.result(5)
    with pytest.raises(BackendUnavailableError, match="shutting down"):
        running.result(5)  # failed at once, although its batch is still running
    gate.set()
    closer.join(5)
    assert not closer.is_alive() and [r.prompt for r in backend.seen] == ["a"]
    with pytest.raises(BackendUnavailableError):
        batcher.submit([sampled("c", 1)])


class ShortBackend(EchoBackend):
    def generate(self, requests):
        return super().generate(requests)[:-1]


def test_a_backend_returning_too_few_results_fails_its_caller():
    batcher = RequestBatcher(ShortBackend(), max_wait_s=0.01)
    with pytest.raises(GenerationError, match="returned 1 results for 2"):
        batcher.submit(reqs("a", "b")).result(5)
    batcher.close()


def test_submissions_past_the_queue_bound_are_refused():
    gate = threading.Event()
    batcher = RequestBatcher(SampleBackend(gate), max_batch=1, max_wait_s=0.01, max_queued=4)
    first = batcher.submit([sampled("a", 1)])
    wait_taken(batcher)  # running, so no longer queued
    queued = batcher.submit([sampled("b", 3, temperature=1.0)])
    with pytest.raises(BackendUnavailableError, match="busy"):
        batcher.submit([sampled("c", 2, temperature=1.0)])  # 3 + 2 > 4
    last = batcher.submit([sampled("d", 1)])  # 3 + 1 fits
    gate.set()
    assert [len(f.result(5)[0].completions) for f in (first, queued, last)] == [1, 3, 1]
    batcher.close()


class SteppedBackend(SampleBackend):
    """Runs one batch per released step and records each batch's prompts as it starts."""

    def __init__(self):
        super().__init__()
        self.steps = threading.Semaphore(0)
        self.started: list[list[str]] = []

    def generate(self, requests):
        self.started.append([r.prompt for r in requests])
        assert self.steps.acquire(timeout=10), "the test never released this batch"
        return super().generate(requests)


def test_small_requests_lead_the_next_batch_without_starving_a_big_one():
    backend = SteppedBackend()
    batcher = RequestBatcher(backend, max_batch=2, max_wait_s=0.01)
    big = batcher.submit([sampled("B", 6, temperature=1.0, max_tokens=100)])
    smalls = []
    for k in range(4):  # a stream of small requests, one arriving during each batch
        deadline = time.monotonic() + 5
        while len(backend.started) <= k:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        smalls.append(batcher.submit([sampled(f"s{k}", 1, max_tokens=1)]))
        backend.steps.release()
    for _ in range(4):
        backend.steps.release()
    assert [len(f.result(5)[0].completions) for f in smalls] == [1] * 4 and len(big.result(5)[0].completions) == 6
    # a small request leads the batch after the one it arrived in; the big one still leads every other batch,
    # and small requests behind it in the ring ride along in its batches
    assert backend.started[:5] == [["B", "B"], ["s0"], ["B", "s1"], ["s2"], ["B", "s3"]]
    batcher.close()
