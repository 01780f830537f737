"""Sampling means the same on every backend: explicit top_k and
repetition_penalty, vLLM's greedy rule, temperatures checked before any engine starts."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from stepforge.serve import openai_backend as ob
from stepforge.serve import vllm_backend as vb
from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
from stepforge.serve.errors import InvalidRequestError
from stepforge.serve.openai_schema import CompletionBody

SETTINGS = {"n": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.2, "max_tokens": 20, "seed": 4}


def test_every_backend_receives_the_same_values(hf_backend):
    s = SamplingParams(**SETTINGS)
    hf = hf_backend._generation_config(s, 20)
    vllm = vb.sampling_kwargs(s, 20)
    openai = ob.completion_api_kwargs(GenerationRequest(prompt="x", sampling=s), "m")
    served = CompletionBody(prompt="x", **{**SETTINGS, **openai["extra_body"]}).to_requests()[0].sampling
    assert served == s  # stepforge serve reads the extra body fields back into the same settings
    got = {
        "hf": (hf.num_return_sequences, hf.temperature, hf.top_p, hf.top_k, hf.repetition_penalty, hf.do_sample),
        "vllm": (vllm["n"], vllm["temperature"], vllm["top_p"], vllm["top_k"], vllm["repetition_penalty"], True),
        "openai": (openai["n"], openai["temperature"], openai["top_p"], openai["extra_body"]["top_k"],
                   openai["extra_body"]["repetition_penalty"], True),
    }
    assert set(got.values()) == {(3, 0.5, 0.9, 7, 1.2, True)}, got


def test_greedy_is_one_sample_at_temperature_zero_everywhere(hf_backend):
    s = SamplingParams(n=4, temperature=1e-6, repetition_penalty=1.1)
    hf = hf_backend._generation_config(s, 5)
    vllm = vb.sampling_kwargs(s, 5)
    openai = ob.completion_api_kwargs(GenerationRequest(prompt="x", sampling=s), "m")
    assert (hf.do_sample, hf.num_return_sequences, hf.repetition_penalty) == (False, 1, 1.1)
    assert (vllm["n"], vllm["temperature"]) == (openai["n"], openai["temperature"]) == (1, 0.0)
    one = SimpleNamespace(choices=[SimpleNamespace(index=0, text="ab", finish_reason="stop")],
                          usage=SimpleNamespace(prompt_tokens=2, completion_tokens=3))
    result = ob.response_to_result(GenerationRequest(prompt="x", sampling=s), one)
    assert result.texts == ["ab"] * 4 and [c.completion_tokens for c in result.completions] == [3] * 4


def test_openai_finish_reasons_and_strict_servers():
    s = SamplingParams(n=3)
    reply = SimpleNamespace(
        choices=[SimpleNamespace(index=i, text="t", finish_reason=r) for i, r in enumerate(["length", "content_filter", "abort"])],
        usage=SimpleNamespace(prompt_tokens=1, completion_tokens=3))
    result = ob.response_to_result(GenerationRequest(prompt="x", sampling=s), reply)
    assert [c.finish_reason for c in result.completions] == ["length", "abort", "abort"]
    assert [c.failed for c in result.completions] == [False, True, True]
    plain = GenerationRequest(prompt="x", sampling=SamplingParams())
    assert "extra_body" not in ob.completion_api_kwargs(plain, "m", extra_fields=False)
    with pytest.raises(InvalidRequestError, match="extra_sampling_fields"):
        ob.completion_api_kwargs(GenerationRequest(prompt="x", sampling=SamplingParams(top_k=5)), "m", extra_fields=False)


def test_checkpoint_generation_config_is_not_inherited(tiny_model_dir, hf_backend, tmp_path):
    """A checkpoint whose generation_config asks for a heavy repetition penalty
    and top_k samples exactly like one without: only the request's settings count."""
    model = tmp_path / "opinionated"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "generation_config.json").read_text())
    cfg.update({"repetition_penalty": 3.0, "top_k": 2, "temperature": 0.1, "no_repeat_ngram_size": 2, "do_sample": True})
    (model / "generation_config.json").write_text(json.dumps(cfg))
    opinionated = make_backend(BackendConfig(kind="hf", model=str(model), device="cpu"))
    reqs = [GenerationRequest(prompt="E1 = step.", sampling=SamplingParams(temperature=0.0, max_tokens=16)),
            GenerationRequest(prompt="Zip", sampling=SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3))]
    assert [r.texts for r in opinionated.generate(reqs)] == [r.texts for r in hf_backend.generate(reqs)]
    penalised = [GenerationRequest(prompt="E1 = step.", sampling=SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=3.0))]
    assert hf_backend.generate(penalised)[0].texts != hf_backend.generate(reqs[:1])[0].texts  # the penalty itself is applied


@pytest.mark.parametrize(
    ("temperature", "fragment"),
    [(-0.1, ">= 0"), (float("nan"), "finite"), (2.5, "at most 2"), (5e-3, "neither greedy"), (1e-5, "neither greedy")],
)
def test_temperatures_vllm_would_change_are_rejected(temperature, fragment):
    with pytest.raises(ValidationError, match=fragment):
        SamplingParams(temperature=temperature)
    with pytest.raises(ValidationError, match=fragment):
        CompletionBody(prompt="x", temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 9.99e-6, 0.01, 0.7, 2.0])
def test_temperatures_every_backend_reads_alike(temperature):
    s = SamplingParams(temperature=temperature, n=2)
    assert s.greedy == (temperature < 1e-5) and s.samples_to_draw == (1 if s.greedy else 2)


def test_top_k_and_penalty_bounds():
    for bad in ({"top_k": -1}, {"repetition_penalty": 0.0}, {"repetition_penalty": float("inf")}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    assert CompletionBody(prompt="x", top_k=-1).to_requests()[0].sampling.top_k == 0  # vLLM's "off" spelling


def test_repetition_penalty_does_not_depend_on_the_batch(hf_backend, monkeypatch):
    """transformers' repetition penalty counts every input id, padding too, so a
    penalised request is never left-padded beside others: it runs alone and
    answers as it does alone."""
    penalised = GenerationRequest(prompt="Zip", sampling=SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=2.0))
    longer = GenerationRequest(prompt="E1 = step.Accum(fn=add, b=1).apply(E0) and more", sampling=penalised.sampling)
    alone = hf_backend.generate([penalised])[0].texts
    widths = []
    real = hf_backend._generate_batch
    monkeypatch.setattr(hf_backend, "_generate_batch", lambda prompts, *a: widths.append(len(prompts)) or real(prompts, *a))
    assert hf_backend.generate([longer, penalised])[1].texts == alone
    assert widths == [1, 1]
