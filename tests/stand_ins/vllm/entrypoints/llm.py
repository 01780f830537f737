"""`LLM`: the offline engine, generating with transformers on CPU.

Each sample is decoded token by token with a KV cache. A step applies, in
vLLM's order: min_tokens (stop ids masked), repetition penalty over prompt
and output ids (positive logits divided, negative multiplied), presence and
frequency penalties over output ids; then greedy argmax, or temperature,
min_p, top_k and top_p and a draw from the sample's generator. A request's
seed seeds sample k with seed + k; requests without a seed share the
engine's generator, seeded once with `LLM(seed=...)`. A sample ends at EOS
(unless ignore_eos), a stop token id, a stop string (text cut before it),
max_tokens or the context: finish reasons stop / stop / stop / length /
length, with vLLM's stop_reason. Unlike a GPU engine, the stand-in is batch
invariant: a sample never depends on the other requests of a call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..lora.request import LoRARequest
from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from ..stand_in import forced_finish

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32", "float32": "float32"}
# The generation_config keys vLLM takes request defaults from when no SamplingParams are given.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class _ModelConfig:
    def __init__(self, model: str, max_model_len: int, dtype: Any):
        self.model = model
        self.max_model_len = max_model_len
        self.dtype = dtype


class _Engine:
    def __init__(self, model_config: _ModelConfig):
        self.model_config = model_config


class LLM:
    """vLLM's offline engine interface, on CPU (engine arguments vLLM takes
    but a CPU has no use for are accepted and ignored; unknown ones are a TypeError)."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        quantization: str | None = None,
        revision: str | None = None,
        seed: int | None = 0,
        gpu_memory_utilization: float = 0.9,
        swap_space: float = 4,
        cpu_offload_gb: float = 0,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        enable_prefix_caching: bool | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 1,
        served_model_name: str | list[str] | None = None,
        distributed_executor_backend: str | None = None,
        generation_config: str = "auto",
        disable_log_stats: bool = True,
    ):
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"Invalid repository ID or local directory specified: {model!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype: {dtype!r}")
        if enable_lora:
            if max_lora_rank not in MAX_LORA_RANKS:
                raise ValueError(f"max_lora_rank ({max_lora_rank}) must be one of {MAX_LORA_RANKS}.")
            if max_loras < 1:
                raise ValueError(f"max_loras ({max_loras}) must be >= 1.")
        self._torch = torch
        self._model_dir = model
        self._dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, local_files_only=True)
        self.model = self._load(model)
        derived = int(getattr(self.model.config, "max_position_embeddings", 2048))
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len ({derived})."
            )
        self.llm_engine = _Engine(_ModelConfig(model, max_model_len or derived, self.model.dtype))
        self.enable_lora, self.max_lora_rank = enable_lora, max_lora_rank
        self._adapters: dict[int, Any] = {}
        self._generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self._requests = 0
        self._eos = self._eos_ids()
        self._cache_arg = _cache_keyword(self.model)
        gen = None
        if generation_config == "auto" and (Path(model) / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(model, local_files_only=True).to_diff_dict()
        self._defaults = {k: gen[k] for k in GENERATION_DEFAULTS if gen and gen.get(k) is not None}
        self.engine_args = {"enable_prefix_caching": enable_prefix_caching, "seed": seed, "max_loras": max_loras,
                            "distributed_executor_backend": distributed_executor_backend, "enforce_eager": enforce_eager}

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=self._dtype).eval()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def get_tokenizer(self):
        """The engine's tokenizer (a transformers tokenizer)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """Request defaults: vLLM's, overridden by the model's generation_config."""
        return SamplingParams(**self._defaults)

    # -- generation ---------------------------------------------------------
    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True, lora_request=None, priority=None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else self.get_default_sampling_params(), len(prompts), "sampling_params")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        outputs = []
        for i, (prompt, sp, lora) in enumerate(zip(prompts, params, loras)):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            text, ids = self._prompt_ids(prompt)
            limit = self.llm_engine.model_config.max_model_len
            if len(ids) > limit:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of {limit}.")
            if not ids:
                raise ValueError("The decoder prompt cannot be empty")
            model = self._model_for(lora)
            samples = [self._finish(i, k, self._sample(model, ids, sp, k, limit), sp, lora) for k in range(sp.n)]
            outputs.append(RequestOutput(str(self._requests), text, ids, None, samples, True, lora))
            self._requests += 1
        return outputs

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"], list(self.tokenizer(prompt["prompt"])["input_ids"])
        raise ValueError(f"a prompt dict needs 'prompt_token_ids' or 'prompt', got keys {sorted(prompt)}")

    def _model_for(self, lora: LoRARequest | None):
        if lora is None:
            return self.model
        if not self.enable_lora:
            raise ValueError(f"Got lora_request {lora} but LoRA is not enabled!")
        if lora.lora_int_id not in self._adapters:
            from peft import PeftModel

            rank = int(json.loads((Path(lora.lora_path) / "adapter_config.json").read_text())["r"])
            if rank > self.max_lora_rank:
                raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
            self._adapters[lora.lora_int_id] = PeftModel.from_pretrained(self._load(self._model_dir), lora.lora_path).eval()
        return self._adapters[lora.lora_int_id]

    def _sample(self, model, prompt: list[int], sp: SamplingParams, index: int, limit: int) -> CompletionOutput:
        torch = self._torch
        gen = self._generator if sp.seed is None else torch.Generator().manual_seed(sp.seed + index)
        out: list[int] = []
        logprobs: list[dict[int, Logprob]] | None = [] if sp.logprobs is not None else None
        cumulative = 0.0
        past, step_input = None, torch.tensor([prompt])
        finish, stop_reason, text = None, None, ""
        with torch.inference_mode():
            while finish is None:
                res = model(input_ids=step_input, **{self._cache_arg: past}, use_cache=True)
                past, raw = res[self._cache_arg], res.logits[0, -1].float()
                token = self._pick(self._process(raw, prompt, out, sp), sp, gen)
                out.append(token)
                if logprobs is not None:
                    logprobs.append(self._logprobs(raw, token, sp.logprobs))
                    cumulative += logprobs[-1][token].logprob
                text = self._detokenize(out, sp)
                finish, stop_reason, text = self._check_stop(token, out, text, sp, len(prompt), limit)
                step_input = torch.tensor([[token]])
        return CompletionOutput(index, text, out, cumulative if logprobs is not None else None, logprobs, finish, stop_reason)

    def _process(self, logits, prompt: list[int], out: list[int], sp: SamplingParams):
        torch = self._torch
        logits = logits.clone()
        if len(out) < sp.min_tokens:
            for t in self._stop_ids(sp):
                logits[t] = -math.inf
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(out)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        if out and (sp.presence_penalty or sp.frequency_penalty):
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).float()
            logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).float()
        return logits

    def _pick(self, logits, sp: SamplingParams, gen) -> int:
        torch = self._torch
        if sp.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / sp.temperature, dim=-1)
        if sp.min_p > 0:
            probs = torch.where(probs < sp.min_p * probs.max(), torch.zeros_like(probs), probs)
        if sp.top_k > 0:
            kth = torch.topk(probs, min(sp.top_k, probs.numel())).values[-1]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if sp.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the likelier tokens
            keep = before < sp.top_p * sorted_probs.sum()
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def _logprobs(self, raw, token: int, k: int) -> dict[int, Logprob]:
        torch = self._torch
        lp = torch.log_softmax(raw, dim=-1)
        ranks = torch.argsort(lp, descending=True)
        wanted = [token] + [int(t) for t in ranks[: lp.numel() if k == -1 else k]]
        return {t: Logprob(float(lp[t]), int((lp > lp[t]).sum()) + 1, self.tokenizer.decode([t])) for t in wanted}

    def _stop_ids(self, sp: SamplingParams) -> set[int]:
        return set(sp.stop_token_ids) | (set() if sp.ignore_eos else self._eos)

    def _detokenize(self, ids: list[int], sp: SamplingParams) -> str:
        if not sp.detokenize:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens,
                                     spaces_between_special_tokens=sp.spaces_between_special_tokens)

    def _check_stop(self, token: int, out: list[int], text: str, sp: SamplingParams, prompt_len: int, limit: int):
        if not sp.ignore_eos and token in self._eos and len(out) >= sp.min_tokens:
            return "stop", None, text
        if token in sp.stop_token_ids and len(out) >= sp.min_tokens:
            return "stop", token, text
        hits = [(text.find(s), s) for s in sp.stop if s in text]
        if hits:
            pos, s = min(hits)
            return "stop", s, text[: pos + len(s)] if sp.include_stop_str_in_output else text[:pos]
        if sp.max_tokens is not None and len(out) >= sp.max_tokens:
            return "length", None, text
        if prompt_len + len(out) >= limit:
            return "length", None, text
        return None, None, text

    def _finish(self, request: int, sample: int, output: CompletionOutput, sp: SamplingParams, lora) -> CompletionOutput:
        """Apply a test's forced finish reason; aborted and failed samples keep half their tokens."""
        output.lora_request = lora
        forced = forced_finish(request, sample)
        if forced is None:
            return output
        if forced in ("abort", "error"):
            output.token_ids = output.token_ids[: len(output.token_ids) // 2]
            output.text = self._detokenize(output.token_ids, sp)
            if output.logprobs is not None:
                output.logprobs = output.logprobs[: len(output.token_ids)]
        output.finish_reason, output.stop_reason = forced, None
        return output


def _cache_keyword(model) -> str:
    """The forward argument taking the KV cache (`cache` in transformers >= 5.24, else `past_key_values`)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _per_prompt(value, count: int, name: str) -> list:
    """`value` for every prompt: one value for all, or a list of exactly `count`."""
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"The lengths of prompts and {name} must be the same.")
        return value
    return [value] * count
