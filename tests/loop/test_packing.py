"""Demonstrations packed into the model's context by the tokenizer's real count (easiest dropped first),
and a bad prompt that fails alone without sending a chunk one request at a time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stepforge.loop.agents.packing import fit_demonstrations
from stepforge.loop.agents.proposer import LLMProposer, generate_isolated
from stepforge.loop.interfaces import Demonstration, ProposalRequest
from stepforge.serve.base import GenerationRequest, ModelBackend
from stepforge.serve.errors import PromptTooLongError


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), max_size=12), min_size=1, max_size=6), st.integers(0, 300),
       st.integers(0, 100))
def test_fit_is_the_longest_prefix_that_fits(demo_sizes, budget, base):
    calls = []

    def count(reqs):
        calls.append(len(reqs))
        return [int(r.request_id) for r in reqs]

    def build(i, k):
        return GenerationRequest(prompt="x", request_id=str(base + sum(demo_sizes[i][:k])))

    fits = fit_demonstrations(count, build, [len(d) for d in demo_sizes], budget)
    for sizes, fit in zip(demo_sizes, fits):
        ok = [k for k in range(len(sizes) + 1) if base + sum(sizes[:k]) <= budget]
        assert fit.keep == (max(ok) if ok else 0)
        assert fit.prompt_tokens == base + sum(sizes[:fit.keep])
    longest = max(len(d) for d in demo_sizes)
    assert len(calls) <= 2 + longest.bit_length()  # one batched count per halving, not one per request


class Wrapped(ModelBackend):
    """The tiny model's backend with a chosen context window, counting what reaches the engine."""

    def __init__(self, inner, context):
        self.inner, self.context, self.sent = inner, context, []

    def context_length(self):
        return self.context

    def count_prompts(self, requests):
        return self.inner.count_prompts(requests)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def generate(self, requests):
        self.sent.append(len(requests))
        return self.inner.generate(requests)


def _demos(bench_keys):
    from stepforge.benchmark.schema import load_benchmark

    tasks = load_benchmark()
    return [Demonstration(task_key=k, task=tasks[k], impl=tasks[k].impl) for k in bench_keys], tasks


def test_the_easiest_demonstrations_are_dropped_to_fit_the_context(hf_backend):
    from stepforge.loop.agents.knowledge import load_knowledge

    demos, tasks = _demos(["moe-index/G_0_7_03", "rope/G_0_3_02", "moe-index/G_0_3_03", "moe-index/G_0_3_04"])
    target = tasks["bmm/bmm_0"]
    request = ProposalRequest(task=target, task_key=target.key, demonstrations=demos, n=1, temperature=0.4, seed=1)
    knowledge = load_knowledge(variant="none")
    probe = LLMProposer(hf_backend, knowledge, max_tokens=4)
    counts = [hf_backend.count_prompts([probe.generation_request(request, 0, k)])[0] for k in range(len(demos) + 1)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    backend = Wrapped(hf_backend, context=counts[2] + 4)  # two demonstrations and the answer fit, not three
    (props,) = LLMProposer(backend, knowledge, max_tokens=4).propose([request])
    assert props and all(p.error is None for p in props)
    assert props[0].dropped == ["moe-index/G_0_3_03", "moe-index/G_0_3_04"]  # the last (easiest) two
    assert props[0].prompt_tokens == counts[2]
    shown = props[0].messages[-1]["content"]
    assert "G_0_7_03" in shown and "G_0_3_02" in shown and "G_0_3_03" not in shown

    backend = Wrapped(hf_backend, context=counts[0] - 1)  # not even the bare prompt fits
    (props,) = LLMProposer(backend, knowledge, max_tokens=4).propose([request])
    assert props[0].error.startswith("PromptTooLongError") and backend.sent == []  # never sent
    assert props[0].dropped == [d.task_key for d in demos]


class Picky(ModelBackend):
    """Fails a whole batch when it holds a prompt marked bad (as an engine does on an over-long prompt)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def count_tokens(self, text):
        return len(text)

    def generate(self, requests):
        self.calls += 1
        if any(r.prompt == "bad" for r in requests):
            raise PromptTooLongError("the prompt is too long")
        return self.inner.generate(requests)


def test_one_bad_prompt_fails_alone_in_a_few_calls(hf_backend):
    from stepforge.serve.base import SamplingParams

    reqs = [GenerationRequest(prompt="bad" if i == 5 else f"E{i} = step.", request_id=str(i),
                              sampling=SamplingParams(max_tokens=2, seed=i)) for i in range(16)]
    backend = Picky(hf_backend)
    results, errors = generate_isolated(backend, reqs)
    assert list(errors) == [5] and "PromptTooLongError" in errors[5] and results[5] is None
    assert [r.request_id for r in results if r is not None] == [str(i) for i in range(16) if i != 5]
    assert backend.calls <= 1 + 2 * 4  # bisection: log2(16) levels, not 1 + 16 single calls
