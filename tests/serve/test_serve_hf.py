"""The transformers backend on the tiny model: sampling, seeds, stops, token counts, chat."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
from stepforge.serve.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from stepforge.serve.prompts import apportion, cut_at_stop, tokens_to_stop

CHAT = [{"role": "system", "content": "You write STeP."}, {"role": "user", "content": "E1 = step.Map"}]


def req(prompt="E1 = step.", rid="", **sampling) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, request_id=rid, sampling=SamplingParams(**sampling))


def test_n_completions_per_prompt_in_request_order(hf_backend):
    reqs = [req("E1 = step.", "a", n=3, max_tokens=8), req("Zip", "b", n=1, max_tokens=5), req("Map", "c", n=2, max_tokens=6)]
    results = hf_backend.generate(reqs)
    assert [r.request_id for r in results] == ["a", "b", "c"]
    assert [len(r.completions) for r in results] == [3, 1, 2]
    for r, max_tokens in zip(results, (8, 5, 6)):
        for c in r.completions:
            assert 1 <= c.completion_tokens <= max_tokens
            if c.finish_reason == "length":
                assert c.completion_tokens == max_tokens


def test_seed_reproducible_and_independent_of_batch(hf_backend):
    alone = hf_backend.generate([req(n=2, max_tokens=12, seed=7)])[0].texts
    batched = hf_backend.generate([req("Zip", n=3, max_tokens=12), req(n=2, max_tokens=12, seed=7)])[1].texts
    assert alone == batched
    assert alone[0] != alone[1]  # the n samples of one seeded request differ
    other = hf_backend.generate([req(n=2, max_tokens=12, seed=8)])[0].texts
    assert other != alone


def test_unseeded_calls_do_not_repeat(hf_backend):
    first = hf_backend.generate([req(n=2, max_tokens=12)])[0].texts
    second = hf_backend.generate([req(n=2, max_tokens=12)])[0].texts
    assert first != second


def test_greedy_is_deterministic(hf_backend):
    a = hf_backend.generate([req(n=2, max_tokens=10, temperature=0.0)])[0].texts
    b = hf_backend.generate([req(n=1, max_tokens=10, temperature=0.0, seed=123)])[0].texts
    assert a[0] == a[1] == b[0]


def test_stop_strings_cut_text_and_tokens(hf_backend):
    stops = ["e", "t"]
    free = hf_backend.generate([req(n=4, max_tokens=32, seed=11)])[0]
    cut = hf_backend.generate([req(n=4, max_tokens=32, seed=11, stop=stops)])[0]
    assert any(c.finish_reason == "stop" for c in cut.completions)
    for f, c in zip(free.completions, cut.completions):
        assert not any(s in c.text for s in stops)
        expected, hit = cut_at_stop(f.text, stops)
        assert c.text == expected
        if hit:
            assert c.finish_reason == "stop"
            assert 1 <= c.completion_tokens <= f.completion_tokens
        else:
            assert c.completion_tokens == f.completion_tokens


def test_prompt_tokens_match_tokenizer(hf_backend):
    tok = hf_backend.tokenizer
    prompt = "E1 = step.Accum(fn=add, b=1).apply(E0)"
    r = hf_backend.generate([req(prompt, max_tokens=3)])[0]
    assert r.prompt_tokens == len(tok(prompt)["input_ids"]) > 5
    assert hf_backend.count_tokens(prompt) == len(tok(prompt, add_special_tokens=False)["input_ids"])


def test_chat_template_applied(hf_backend):
    tok = hf_backend.tokenizer
    expected = tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    r = hf_backend.generate([GenerationRequest(messages=CHAT, sampling=SamplingParams(max_tokens=4))])[0]
    assert r.prompt_tokens == len(expected)
    assert r.prompt_tokens > hf_backend.count_tokens("".join(m["content"] for m in CHAT)) + 4


def test_completion_accounting_with_eos(hf_backend):
    """A row ending in EOS counts the EOS; padding after it is ignored."""
    tok = hf_backend.tokenizer
    body = tok("step Map", add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id
    c = hf_backend._completion(body + [eos, pad, pad], [])
    assert (c.text, c.finish_reason, c.completion_tokens) == ("step Map", "stop", len(body) + 1)
    c = hf_backend._completion(body, [])
    assert (c.finish_reason, c.completion_tokens) == ("length", len(body))
    c = hf_backend._completion(body + [eos], [" Map"])
    assert (c.text, c.finish_reason, c.completion_tokens) == ("step", "stop", len(body))


def test_tokens_to_stop_finds_the_completing_token():
    pieces = ["ab", "c", "de", "f"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert tokens_to_stop(decode, [0, 1, 2, 3], ["cd"]) == 3
    assert tokens_to_stop(decode, [0, 1, 2, 3], ["b"]) == 1
    assert tokens_to_stop(decode, [0, 1, 2, 3], ["zz"]) == 4
    assert apportion(10, [1, 1, 2]) == [3, 2, 5]
    assert sum(apportion(7, [3, 0, 5])) == 7 and apportion(7, [3, 0, 5])[1] == 0


def test_prompt_too_long(tiny_model_dir):
    backend = make_backend(BackendConfig(kind="hf", model=str(tiny_model_dir), device="cpu", max_model_len=8))
    with pytest.raises(PromptTooLongError, match="context is 8"):
        backend.generate([req("E1 = step.Map(fn=f).apply(E0) and much more text", max_tokens=4)])
    short = backend.generate([req("E1", max_tokens=50)])[0]
    assert short.prompt_tokens + short.completions[0].completion_tokens <= 8


def test_empty_prompt_is_an_invalid_request(hf_backend):
    with pytest.raises(InvalidRequestError, match="empty"):
        hf_backend.generate([req("", max_tokens=2)])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        make_backend(BackendConfig(kind="hf", model=str(tmp_path / "nope")))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        make_backend(BackendConfig(kind="hf", model=str(tmp_path)))


def test_request_validation():
    with pytest.raises(ValidationError):
        GenerationRequest(prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ValidationError):
        GenerationRequest()
    with pytest.raises(ValidationError):
        SamplingParams(n=0)
    assert SamplingParams(stop="END").stop == ["END"]


def test_lora_adapter_is_applied(tiny_model_dir, hf_backend, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False, lora_alpha=64)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    tuned = make_backend(BackendConfig(kind="hf", model=str(tiny_model_dir), device="cpu", lora_path=str(tmp_path / "adapter")))
    greedy = req(n=1, max_tokens=12, temperature=0.0)
    assert tuned.generate([greedy])[0].texts != hf_backend.generate([greedy])[0].texts
    with pytest.raises(ModelNotFoundError, match="adapter"):
        make_backend(BackendConfig(kind="hf", model=str(tiny_model_dir), lora_path=str(tmp_path)))
