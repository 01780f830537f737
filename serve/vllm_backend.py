"""vLLM backend: the offline `vllm.LLM` engine on GPUs.

vLLM is imported only when a backend is built, so this module (and its pure
mapping functions, which the tests exercise without vLLM) imports anywhere.
Prompts are tokenized here, with the engine's own tokenizer and the model's
chat template, and handed to `LLM.generate` as token prompts: chat and raw
requests then share one engine call (prefix caching sees every prompt of a
round together) and prompt token counts are exact.

Reproducibility, as vLLM documents it (docs: usage/reproducibility, features/
batch_invariance): a request's `seed` fixes its sampling random numbers, but
vLLM does not promise the same tokens by default, because the numerics of a
step depend on which other requests share the batch. Reruns repeat exactly
only on the same hardware and vLLM version, and only with deterministic
scheduling (offline: VLLM_ENABLE_V1_MULTIPROCESSING=0) or batch invariance
(`batch_invariant: true` here, i.e. VLLM_BATCH_INVARIANT=1; beta, on recent
NVIDIA GPUs: compute capability 8.0+ or 9.0+ depending on the vLLM release). The engine's global `seed` (V1 default 0) seeds
requests without their own seed.

Every finish reason vLLM reports (stop, length, repetition, abort, error) is
kept per sample; an aborted or failed sample never fails the batch.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from .base import (
    FAILED,
    BackendConfig,
    Completion,
    GenerationRequest,
    GenerationResult,
    ModelBackend,
    SamplingParams,
    finish_outcome,
)
from .config import VLLM_LORA_RANKS
from .errors import BackendUnavailableError, GenerationError, ModelNotFoundError
from .hf_backend import check_adapter_dir, check_model_dir
from .prompts import encode_prompt, new_token_budget

LORA_NAME = "stepforge-adapter"
LORA_ID = 1


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank `r` recorded in a peft adapter's adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, KeyError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read the LoRA rank from {path}: {exc}") from None


def max_lora_rank(config: BackendConfig) -> int:
    """The engine's `max_lora_rank`: configured, else the adapter's rank rounded
    up to a rank vLLM supports."""
    if config.max_lora_rank is not None:
        return config.max_lora_rank
    rank = adapter_rank(config.lora_path)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ModelNotFoundError(f"LoRA rank {rank} exceeds vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def engine_kwargs(config: BackendConfig) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(...)` for a backend config.

    `config.engine_kwargs` is applied last, so any engine argument (e.g.
    `enforce_eager`, `swap_space`) can be set or overridden from the config.
    """
    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer or config.model,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_prefix_caching": config.enable_prefix_caching,
        "seed": config.seed,
        "trust_remote_code": False,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.served_model_name:
        kwargs["served_model_name"] = config.served_model_name
    if config.tensor_parallel_size > 1:
        # Inside a Ray actor that already holds the GPUs, worker processes must
        # not ask Ray for more: use vLLM's multiprocessing executor.
        kwargs["distributed_executor_backend"] = "mp"
    if config.lora_path:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = max_lora_rank(config)
        kwargs["max_loras"] = 1
    kwargs.update(config.engine_kwargs)
    return kwargs


def sampling_kwargs(sampling: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams(...)` for one request.

    Greedy requests go as temperature 0 and n 1 (vLLM rejects greedy with
    n > 1); top_k 0 (off) goes as -1, which every vLLM release reads as off.
    """
    return {
        "n": sampling.samples_to_draw,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or -1,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": max_tokens,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }


def token_prompt(prompt_ids: list[int]) -> dict[str, list[int]]:
    """A vLLM `TokensPrompt` (a typed dict) for pre-tokenized input."""
    return {"prompt_token_ids": list(prompt_ids)}


def to_result(request: GenerationRequest, output: Any) -> GenerationResult:
    """Map a vLLM `RequestOutput` to our result.

    Token counts come from the engine: `prompt_token_ids` and each
    `CompletionOutput.token_ids` (which end with EOS, or with the token that
    completed a stop string; the stop string itself is not in the text).
    Each sample keeps its own finish reason: abort, error or an unknown reason
    marks that sample failed and never raises for the batch.
    """
    completions = []
    for out in sorted(output.outputs, key=lambda o: o.index):
        reason, detail = finish_outcome(out.finish_reason)
        if reason in FAILED and detail is None:
            detail = f"vLLM finished the sample with {reason!r}"
        completions.append(
            Completion(text=out.text, finish_reason=reason, completion_tokens=len(out.token_ids), detail=detail)
        )
    n = request.sampling.n
    if request.sampling.greedy and len(completions) == 1 and n > 1:
        completions = [completions[0].model_copy() for _ in range(n)]
    if len(completions) != n:
        raise GenerationError(f"vLLM returned {len(completions)} completions, expected {n}")
    return GenerationResult(
        request_id=request.request_id, prompt_tokens=len(output.prompt_token_ids), completions=completions
    )


def engine_max_model_len(llm: Any, config: BackendConfig) -> int | None:
    """The engine's context length (configured, else what the engine derived)."""
    if config.max_model_len is not None:
        return config.max_model_len
    engine = getattr(llm, "llm_engine", None)
    model_config = getattr(engine, "model_config", None)
    return getattr(model_config, "max_model_len", None)


class VLLMBackend(ModelBackend):
    """vLLM's offline engine behind the backend interface (GPU machines)."""

    def __init__(self, config: BackendConfig):
        check_model_dir(config.model)
        if config.lora_path:
            check_adapter_dir(config.lora_path)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise BackendUnavailableError(
                f"vLLM is not installed ({exc}); install stepforge[gpu] on a CUDA machine or use kind 'hf'"
            ) from None
        self.config = config
        self._sampling_cls = vllm.SamplingParams
        if config.batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read when the engine starts
        self.llm = vllm.LLM(**engine_kwargs(config))
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_request = LoRARequest(LORA_NAME, LORA_ID, config.lora_path) if config.lora_path else None
        self.max_model_len = engine_max_model_len(self.llm, config)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the engine's tokenizer, no special tokens added."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One engine call for the whole batch; outputs come back in prompt order."""
        if not requests:
            return []
        prompts = [encode_prompt(self.tokenizer, r) for r in requests]
        params = [
            self._sampling_cls(**sampling_kwargs(r.sampling, new_token_budget(len(p), r.sampling.max_tokens, self.max_model_len)))
            for r, p in zip(requests, prompts)
        ]
        outputs = self.llm.generate(
            [token_prompt(p) for p in prompts], params, use_tqdm=False, lora_request=self.lora_request
        )
        return [to_result(r, o) for r, o in zip(requests, outputs)]

    def close(self) -> None:
        """Drop the engine and free GPU memory."""
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
