"""The vLLM backend end to end on CPU, against the stand-in engine of
tests/stand_ins (vLLM's documented interface, generating with transformers).

Differential checks: greedy decoding, repetition penalty, stop strings and a
LoRA adapter give the same tokens through the vLLM backend as through the
transformers backend; the stand-in's SamplingParams accepts exactly what our
sampling settings send, and vLLM's finish reasons become per-sample outcomes.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_vllm import make_adapter

from stepforge.serve import vllm_backend as vb
from stepforge.serve.base import (
    GREEDY_BELOW,
    MIN_SAMPLED_TEMPERATURE,
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    check_temperature,
    make_backend,
)

FINISH_ENV = "STAND_IN_VLLM_FINISH"


@pytest.fixture(scope="module")
def vllm_backend(stand_in_vllm, tiny_model_dir):
    backend = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir), max_model_len=512))
    yield backend
    backend.close()


def req(prompt="E1 = step.", rid="", **sampling) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, request_id=rid, sampling=SamplingParams(**sampling))


def dumped(results):
    return [[c.model_dump() for c in r.completions] for r in results]


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0, "n": 2, "max_tokens": 12},
        {"temperature": 0.0, "max_tokens": 12, "repetition_penalty": 1.5},
        {"temperature": 1e-6, "max_tokens": 24, "stop": ["e", "t"]},
    ],
    ids=["greedy", "repetition-penalty", "stop-strings"],
)
def test_greedy_tokens_match_the_transformers_backend(vllm_backend, hf_backend, sampling):
    reqs = [req("E1 = step.", "a", **sampling),
            GenerationRequest(messages=[{"role": "user", "content": "Map"}], sampling=SamplingParams(**sampling))]
    got, want = vllm_backend.generate(reqs), hf_backend.generate(reqs)
    assert dumped(got) == dumped(want)
    assert [r.prompt_tokens for r in got] == [r.prompt_tokens for r in want]


def test_repetition_penalty_changes_greedy_output(vllm_backend):
    plain = vllm_backend.generate([req(temperature=0.0, max_tokens=16)])[0].texts
    penalised = vllm_backend.generate([req(temperature=0.0, max_tokens=16, repetition_penalty=1.5)])[0].texts
    assert plain != penalised


def test_seeded_requests_reproduce_and_samples_differ(vllm_backend):
    first = vllm_backend.generate([req(n=3, max_tokens=12, seed=7), req("Zip", max_tokens=12)])[0].texts
    again = vllm_backend.generate([req(n=3, max_tokens=12, seed=7)])[0].texts
    assert first == again and len(set(first)) > 1
    assert vllm_backend.generate([req(n=3, max_tokens=12, seed=8)])[0].texts != first


def test_top_k_one_is_greedy(vllm_backend):
    greedy = vllm_backend.generate([req(temperature=0.0, max_tokens=10)])[0].texts[0]
    top1 = vllm_backend.generate([req(n=3, temperature=1.5, top_k=1, max_tokens=10, seed=2)])[0].texts
    assert top1 == [greedy] * 3


def test_finish_reasons_are_per_sample(vllm_backend, monkeypatch):
    """Aborted, failed, repetitive and unknown-reason samples come back in
    place; the rest of the batch is untouched."""
    reqs = [req(n=2, max_tokens=10, seed=1), req("Zip", n=2, max_tokens=10, seed=2), req("Map", max_tokens=10, seed=3),
            req("Copy", max_tokens=10, seed=4)]
    clean = vllm_backend.generate(reqs)
    monkeypatch.setenv(FINISH_ENV, json.dumps({"0/1": "abort", "1": "repetition", "2": "error", "3": "brand-new"}))
    odd = vllm_backend.generate(reqs)
    assert [[c.finish_reason for c in r.completions] for r in odd] == [
        [clean[0].completions[0].finish_reason, "abort"], ["repetition", "repetition"], ["error"], ["error"]]
    assert odd[0].completions[0] == clean[0].completions[0]
    assert odd[0].completions[1].failed and odd[0].completions[1].completion_tokens == clean[0].completions[1].completion_tokens // 2
    assert not odd[1].completions[0].failed and odd[1].texts == clean[1].texts
    assert odd[2].completions[0].failed and "error" in odd[2].completions[0].detail
    assert "unknown finish_reason 'brand-new'" in odd[3].completions[0].detail


def test_lora_adapter_matches_transformers(stand_in_vllm, tiny_model_dir, tmp_path):
    """A rank-1 adapter (vLLM allows max_lora_rank 1) changes the output, the same way on both backends."""
    adapter = str(make_adapter(tiny_model_dir, tmp_path / "r1", r=1))
    greedy = [req(temperature=0.0, max_tokens=12)]
    tuned = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir), lora_path=adapter))
    assert tuned.llm.max_lora_rank == 1
    hf_tuned = make_backend(BackendConfig(kind="hf", model=str(tiny_model_dir), device="cpu", lora_path=adapter))
    base = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir)))
    assert dumped(tuned.generate(greedy)) == dumped(hf_tuned.generate(greedy))
    assert tuned.generate(greedy)[0].texts != base.generate(greedy)[0].texts


def test_engine_settings_reach_the_engine(stand_in_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    backend = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir), seed=11, enable_prefix_caching=False,
                                         batch_invariant=True, max_model_len=100))
    assert backend.llm.engine_args["seed"] == 11 and backend.llm.engine_args["enable_prefix_caching"] is False
    assert backend.max_model_len == 100 and backend.llm.llm_engine.model_config.max_model_len == 100
    import os

    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_stand_in_sampling_params_follow_vllm(stand_in_vllm):
    sp = stand_in_vllm.SamplingParams
    bad = [({"temperature": -0.1}, "non-negative"), ({"temperature": 2.5}, r"in \[0, 2\]"), ({"top_p": 0.0}, "top_p"),
           ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0.0}, "greater than zero"), ({"max_tokens": 0}, "max_tokens"),
           ({"n": 0}, "at least 1"), ({"stop": [""]}, "empty string"), ({"temperature": 0.0, "n": 2}, "greedy")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            sp(**kwargs)
    with pytest.raises(ValueError, match=r"^n must be 1 when using greedy sampling, got 3\.$"):
        sp(temperature=0.0, n=3)
    assert sp(temperature=0.004).temperature == 0.01  # vLLM raises tiny temperatures to 0.01 ...
    assert not sp(temperature=1e-6).greedy  # ... before its greedy test: so our backend sends greedy as 0
    assert sp(seed=-1).seed is None and sp(stop="x").stop == ["x"]
    greedy = sp(temperature=0.0, top_p=0.5, top_k=5)
    assert (greedy.top_p, greedy.top_k) == (1.0, 0)
    with pytest.raises(TypeError):
        sp(best_of=2)
    with pytest.raises(ValueError, match="id must be > 0"):
        __import__("vllm.lora.request", fromlist=["LoRARequest"]).LoRARequest("x", 0, "/p")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 4),
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(0, 50),
    repetition_penalty=st.floats(0.1, 3.0),
)
def test_what_we_accept_vllm_accepts_unchanged(stand_in_vllm, n, temperature, top_p, top_k, repetition_penalty):
    """Every temperature our check accepts reaches vLLM as the same sampling
    (greedy stays greedy with n 1; no silent raise to 0.01); every other one in
    [0, 2] is one vLLM would have changed."""
    try:
        check_temperature(temperature)
    except ValueError:
        assert GREEDY_BELOW <= temperature < MIN_SAMPLED_TEMPERATURE
        return
    ours = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
    theirs = stand_in_vllm.SamplingParams(**vb.sampling_kwargs(ours, 16))
    assert theirs.greedy == ours.greedy
    assert theirs.n == ours.samples_to_draw
    if not ours.greedy:
        assert math.isclose(theirs.temperature, temperature) and theirs.top_k == (top_k or -1) and theirs.top_p == top_p
    assert theirs.repetition_penalty == repetition_penalty


@pytest.mark.parametrize("backend", ["vllm_backend", "hf_backend"])
def test_count_prompt_tokens_is_what_generate_reports(backend, request):
    """The estimate's counter (`count_prompts`) equals the prompt tokens `generate` reports, chat and raw."""
    b = request.getfixturevalue(backend)
    chat = GenerationRequest(messages=[{"role": "system", "content": "You write STeP."},
                                       {"role": "user", "content": "E1 = step.Map"}],
                             sampling=SamplingParams(n=1, temperature=0.0, max_tokens=2, seed=0))
    raw = req("E1 = step.Zip", max_tokens=2)
    counted = b.count_prompts([chat, raw])
    assert counted == [r.prompt_tokens for r in b.generate([chat, raw])] and all(c > 0 for c in counted)
