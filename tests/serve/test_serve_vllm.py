"""The vLLM backend's mapping to vLLM's API, tested without vLLM installed;
plus one real-engine test that runs only where vLLM and CUDA exist."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from types import SimpleNamespace

import pytest

from stepforge.serve import vllm_backend as vb
from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
from stepforge.serve.errors import BackendUnavailableError, GenerationError, PromptTooLongError


def out(index, text, token_ids, finish="length"):
    return SimpleNamespace(index=index, text=text, token_ids=token_ids, finish_reason=finish, stop_reason=None)


def test_engine_kwargs_defaults(tiny_model_dir):
    kw = vb.engine_kwargs(BackendConfig(kind="vllm", model=str(tiny_model_dir), max_model_len=512))
    assert kw["model"] == kw["tokenizer"] == str(tiny_model_dir)
    assert kw["enable_prefix_caching"] is True
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
    s = SamplingParams(n=4, temperature=0.4, top_p=0.9, max_tokens=100, seed=3, stop=["\n\n", "```"])
    assert vb.sampling_kwargs(s, 60) == {
        "n": 4, "temperature": 0.4, "top_p": 0.9, "max_tokens": 60, "seed": 3, "stop": ["\n\n", "```"],
        "include_stop_str_in_output": False, "skip_special_tokens": True,
    }
    greedy = vb.sampling_kwargs(SamplingParams(n=3, temperature=0.0), 10)
    assert greedy["n"] == 1 and greedy["stop"] is None


def test_to_result_maps_outputs_in_index_order():
    req = GenerationRequest(prompt="p", request_id="r7", sampling=SamplingParams(n=2))
    ro = SimpleNamespace(request_id="0", prompt_token_ids=[1, 2, 3], outputs=[out(1, "b", [5, 6, 7], "stop"), out(0, "a", [4, 5])])
    res = vb.to_result(req, ro)
    assert res.request_id == "r7" and res.prompt_tokens == 3
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in res.completions] == [("a", "length", 2), ("b", "stop", 3)]


def test_to_result_greedy_repeats_and_rejects_aborts():
    req = GenerationRequest(prompt="p", sampling=SamplingParams(n=3, temperature=0.0))
    res = vb.to_result(req, SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out(0, "x", [9])]))
    assert res.texts == ["x", "x", "x"]
    with pytest.raises(GenerationError, match="abort"):
        vb.to_result(req, SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out(0, "", [], "abort")]))


def test_missing_vllm_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailableError, match="vLLM is not installed"):
        make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir)))


class FakeLLM:
    """Records how the backend drives vllm.LLM; answers like the real engine."""

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.calls = []
        self._tok = AutoTokenizer.from_pretrained(kwargs["tokenizer"], local_files_only=True)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64))

    def get_tokenizer(self):
        return self._tok

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, params, use_tqdm, lora_request))
        return [
            SimpleNamespace(
                request_id=str(i), prompt_token_ids=p["prompt_token_ids"],
                outputs=[out(k, f"s{k}", [7] * (k + 1)) for k in range(sp.kwargs["n"])],
            )
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = lambda **kw: SimpleNamespace(kwargs=kw)
    lora_mod = types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = lambda name, int_id, path: SimpleNamespace(name=name, id=int_id, path=path)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_mod)
    return mod


def test_backend_drives_engine(fake_vllm, tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    backend = make_backend(BackendConfig(kind="vllm", model=str(tiny_model_dir), lora_path=str(tmp_path)))
    tok = backend.tokenizer
    chat = [{"role": "user", "content": "E1 = step."}]
    reqs = [
        GenerationRequest(prompt="E1 = step.", request_id="a", sampling=SamplingParams(n=2, max_tokens=100, seed=5)),
        GenerationRequest(messages=chat, request_id="b", sampling=SamplingParams(n=1, max_tokens=8)),
    ]
    results = backend.generate(reqs)
    prompts, params, use_tqdm, lora = backend.llm.calls[0]
    assert prompts[0]["prompt_token_ids"] == tok("E1 = step.")["input_ids"]
    assert prompts[1]["prompt_token_ids"] == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert params[0].kwargs["seed"] == 5 and params[0].kwargs["n"] == 2
    assert params[0].kwargs["max_tokens"] == 64 - len(prompts[0]["prompt_token_ids"])  # capped by the context
    assert use_tqdm is False and (lora.name, lora.id, lora.path) == (vb.LORA_NAME, vb.LORA_ID, str(tmp_path))
    assert backend.llm.kwargs["enable_lora"] is True
    assert [r.request_id for r in results] == ["a", "b"]
    assert results[0].texts == ["s0", "s1"] and [c.completion_tokens for c in results[0].completions] == [1, 2]
    assert results[1].prompt_tokens == len(prompts[1]["prompt_token_ids"])
    with pytest.raises(PromptTooLongError):
        backend.generate([GenerationRequest(prompt="step " * 100)])


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
