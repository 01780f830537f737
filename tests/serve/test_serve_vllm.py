"""The vLLM backend's mapping to vLLM's API, tested without vLLM installed
(pure mappings, and the backend driving the stand-in engine of
tests/stand_ins); plus one real-engine test that runs only where vLLM and CUDA exist."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest

from stepforge.serve import vllm_backend as vb
from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
from stepforge.serve.errors import BackendUnavailableError, GenerationError, ModelNotFoundError, PromptTooLongError


def out(index, text, token_ids, finish="length"):
    return SimpleNamespace(index=index, text=text, token_ids=token_ids, finish_reason=finish, stop_reason=None)


def test_engine_kwargs_defaults(tiny_model_dir):
    kw = vb.engine_kwargs(BackendConfig(kind="vllm", model=str(tiny_model_dir), max_model_len=512))
    assert kw["model"] == kw["tokenizer"] == str(tiny_model_dir)
    assert kw["enable_prefix_caching"] is True and kw["seed"] == 0
    assert kw["tensor_parallel_size"] == 1 and kw["max_model_len"] == 512
    assert "enable_lora" not in kw and "distributed_executor_backend" not in kw


def test_engine_kwargs_lora_tp_and_overrides(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    cfg = BackendConfig(
        kind="vllm", model="/models/qwen", tensor_parallel_size=4, gpu_memory_utilization=0.8,
        lora_path=str(tmp_path), enable_prefix_caching=False, engine_kwargs={"enforce_eager": True, "dtype": "half"},
    )
    kw = vb.engine_kwargs(cfg)
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 16 and kw["max_loras"] == 1
    assert kw["tensor_parallel_size"] == 4 and kw["distributed_executor_backend"] == "mp"
    assert kw["gpu_memory_utilization"] == 0.8 and kw["enable_prefix_caching"] is False
    assert kw["enforce_eager"] is True and kw["dtype"] == "half"
    assert cfg.actor_num_gpus() == 4.0
    assert vb.engine_kwargs(cfg.model_copy(update={"max_lora_rank": 64}))["max_lora_rank"] == 64


def test_sampling_kwargs():
    s = SamplingParams(n=4, temperature=0.4, top_p=0.9, top_k=7, repetition_penalty=1.2, max_tokens=100, seed=3,
                       stop=["\n\n", "```"])
    assert vb.sampling_kwargs(s, 60) == {
        "n": 4, "temperature": 0.4, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.2, "max_tokens": 60, "seed": 3,
        "stop": ["\n\n", "```"], "include_stop_str_in_output": False, "skip_special_tokens": True,
    }
    greedy = vb.sampling_kwargs(SamplingParams(n=3, temperature=0.0), 10)
    assert greedy["n"] == 1 and greedy["stop"] is None and greedy["top_k"] == -1
    tiny = vb.sampling_kwargs(SamplingParams(n=2, temperature=5e-6), 10)  # greedy by vLLM's rule: sent as 0, n 1
    assert (tiny["temperature"], tiny["n"]) == (0.0, 1)


def test_to_result_maps_outputs_in_index_order():
    req = GenerationRequest(prompt="p", request_id="r7", sampling=SamplingParams(n=2))
    ro = SimpleNamespace(request_id="0", prompt_token_ids=[1, 2, 3], outputs=[out(1, "b", [5, 6, 7], "stop"), out(0, "a", [4, 5])])
    res = vb.to_result(req, ro)
    assert res.request_id == "r7" and res.prompt_tokens == 3
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in res.completions] == [("a", "length", 2), ("b", "stop", 3)]


@pytest.mark.parametrize(
    ("raw", "reason", "failed"),
    [("stop", "stop", False), ("length", "length", False), ("repetition", "repetition", False),
     ("abort", "abort", True), ("error", "error", True), (None, "error", True), ("mystery", "error", True)],
)
def test_every_finish_reason_is_a_per_sample_outcome(raw, reason, failed):
    """vLLM V1's finish reasons (and unknown or missing ones) never raise for the batch."""
    req = GenerationRequest(prompt="p", sampling=SamplingParams(n=2))
    res = vb.to_result(req, SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out(0, "x", [9], raw), out(1, "y", [8, 7])]))
    first, second = res.completions
    assert (first.finish_reason, first.failed, first.text) == (reason, failed, "x")
    assert (first.detail is not None) == failed
    assert (second.finish_reason, second.failed) == ("length", False)


def test_to_result_greedy_repeats():
    req = GenerationRequest(prompt="p", sampling=SamplingParams(n=3, temperature=0.0))
    res = vb.to_result(req, SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out(0, "x", [9])]))
    assert res.texts == ["x", "x", "x"]
    sampled = GenerationRequest(prompt="p", sampling=SamplingParams(n=3))
    with pytest.raises(GenerationError, match="expected 3"):
        vb.to_result(sampled, SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out(0, "x", [9])]))


def test_lora_rank_rounds_up_to_vllm_ranks(tmp_path):
    for r, expected in [(1, 1), (2, 8), (12, 16), (320, 320), (400, 512)]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert vb.max_lora_rank(BackendConfig(kind="vllm", model="/m", lora_path=str(tmp_path))) == expected
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ModelNotFoundError, match="exceeds"):
        vb.max_lora_rank(BackendConfig(kind="vllm", model="/m", lora_path=str(tmp_path)))


def test_missing_vllm_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailableError, match="vLLM is not installed"):
        make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir)))


def test_backend_drives_engine(stand_in_vllm, tiny_model_dir, tmp_path, monkeypatch):
    """The real backend against the stand-in engine: token prompts, one engine
    call per batch, per-request SamplingParams, the LoRA request, the context cap."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=8)
    backend = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir), lora_path=str(adapter), max_model_len=64))
    calls = []
    real_generate = backend.llm.generate

    def spy(prompts, params, **kwargs):
        calls.append((prompts, params, kwargs))
        return real_generate(prompts, params, **kwargs)

    monkeypatch.setattr(backend.llm, "generate", spy)
    tok = backend.tokenizer
    chat = [{"role": "user", "content": "E1 = step."}]
    reqs = [
        GenerationRequest(prompt="E1 = step.", request_id="a", sampling=SamplingParams(n=2, max_tokens=100, seed=5)),
        GenerationRequest(messages=chat, request_id="b", sampling=SamplingParams(n=1, max_tokens=8)),
    ]
    results = backend.generate(reqs)
    (prompts, params, kwargs), = calls
    assert prompts[0]["prompt_token_ids"] == tok("E1 = step.")["input_ids"]
    assert prompts[1]["prompt_token_ids"] == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert isinstance(params[0], stand_in_vllm.SamplingParams) and params[0].seed == 5 and params[0].n == 2
    assert params[0].max_tokens == 64 - len(prompts[0]["prompt_token_ids"])  # capped by the context
    lora = kwargs["lora_request"]
    assert kwargs["use_tqdm"] is False and (lora.lora_name, lora.lora_int_id, lora.lora_path) == (vb.LORA_NAME, vb.LORA_ID, str(adapter))
    assert backend.llm.enable_lora and backend.llm.max_lora_rank == 8
    assert [r.request_id for r in results] == ["a", "b"]
    assert len(results[0].completions) == 2 and results[0].texts[0] != results[0].texts[1]
    assert all(c.completion_tokens >= 1 and not c.failed for r in results for c in r.completions)
    assert results[1].prompt_tokens == len(prompts[1]["prompt_token_ids"])
    with pytest.raises(PromptTooLongError):
        backend.generate([GenerationRequest(prompt="step " * 100)])


def make_adapter(model_dir, out, r: int):
    """A random (non-zero) peft LoRA adapter of rank `r` for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_real_vllm_engine(tiny_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    backend = make_backend(
        BackendConfig(kind="vllm", model=str(tiny_model_dir), max_model_len=512, gpu_memory_utilization=0.3,
                      engine_kwargs={"enforce_eager": True})
    )
    try:
        reqs = [
            GenerationRequest(prompt="E1 = step.", request_id="x", sampling=SamplingParams(n=3, max_tokens=16, seed=1)),
            GenerationRequest(messages=[{"role": "user", "content": "Map"}], sampling=SamplingParams(max_tokens=8, stop=["e"])),
        ]
        first, second = backend.generate(reqs), backend.generate(reqs)
        assert first[0].texts == second[0].texts and len(first[0].completions) == 3
        assert first[0].prompt_tokens == backend.count_tokens("E1 = step.")
        assert all("e" not in c.text for c in first[1].completions)
    finally:
        backend.close()
