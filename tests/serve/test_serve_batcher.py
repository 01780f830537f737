"""The request batcher merges concurrent submissions and isolates failures."""

from __future__ import annotations

import threading

import pytest

from stepforge.serve.base import Completion, GenerationRequest, GenerationResult, ModelBackend
from stepforge.serve.batcher import RequestBatcher
from stepforge.serve.errors import PromptTooLongError


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
