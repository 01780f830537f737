"""The one backend interface: requests and results, and the backend factory.

Every backend (transformers, vLLM, OpenAI-compatible HTTP, a Ray pool of any
of them) takes a batch of `GenerationRequest`s and returns one
`GenerationResult` per request, in request order, with exact token counts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from stepforge.registry import Registry

from .config import BackendConfig, load_backend_config  # re-exported

__all__ = [
    "BackendConfig",
    "Completion",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "ModelBackend",
    "SamplingParams",
    "check_temperature",
    "finish_outcome",
    "is_greedy",
    "load_backend_config",
    "make_backend",
]


# Temperatures, as vLLM reads them (vllm/sampling_params.py): below
# GREEDY_BELOW (its _SAMPLING_EPS) decoding is greedy, and vLLM then demands
# n == 1; a positive temperature below MIN_SAMPLED_TEMPERATURE (its _MAX_TEMP)
# is silently raised to it; above MAX_TEMPERATURE it is rejected.
GREEDY_BELOW = 1e-5
MIN_SAMPLED_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0


def check_temperature(value: float) -> float:
    """`value` if every backend samples it the same way, else ValueError.

    Accepted: greedy (below GREEDY_BELOW, e.g. 0) or a sampling temperature
    in [MIN_SAMPLED_TEMPERATURE, MAX_TEMPERATURE]. In between, vLLM would
    quietly sample at 0.01 while transformers samples at the value given.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {value}")
    if value > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g} (vLLM rejects more), got {value}")
    if GREEDY_BELOW <= value < MIN_SAMPLED_TEMPERATURE:
        raise ValueError(
            f"temperature {value} is neither greedy (< {GREEDY_BELOW:g}, e.g. 0) nor >= {MIN_SAMPLED_TEMPERATURE:g} "
            "(vLLM raises smaller temperatures to 0.01)"
        )
    return value


def is_greedy(temperature: float) -> bool:
    """True when `temperature` means greedy decoding (vLLM's rule)."""
    return temperature < GREEDY_BELOW


class SamplingParams(BaseModel):
    """How to sample: n completions per prompt; a temperature below 1e-5
    (e.g. 0) is greedy, which every backend decodes once and repeats n times.

    `top_k` (0 = off) and `repetition_penalty` (1.0 = off) are always sent
    explicitly, so no backend falls back on a checkpoint's generation_config.
    `seed` fixes the sampling random numbers of this request; how far that
    makes it reproducible depends on the backend (see each backend's
    docstring). `stop` strings end a completion and are never part of its text.
    """

    n: int = Field(default=1, ge=1)
    temperature: float = 0.7
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    max_tokens: int = Field(default=512, ge=1)
    seed: int | None = None
    stop: list[str] = []

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        """True for greedy decoding."""
        return is_greedy(self.temperature)

    @property
    def samples_to_draw(self) -> int:
        """Samples a backend must generate: greedy decoding has one answer,
        so it is decoded once (as vLLM requires) and repeated `n` times."""
        return 1 if self.greedy else self.n


class GenerationRequest(BaseModel):
    """One prompt: raw text (`prompt`) or chat `messages`, plus sampling settings."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str = ""

    @model_validator(mode="after")
    def _one_input(self) -> "GenerationRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            for i, msg in enumerate(self.messages):
                if "role" not in msg or "content" not in msg:
                    raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        return self

    @property
    def is_chat(self) -> bool:
        """True when the request carries chat messages."""
        return self.messages is not None


FinishReason = Literal["stop", "length", "repetition", "abort", "error"]
# vLLM V1's finish reasons (vllm/v1/engine FINISH_REASON_STRINGS). stop: EOS,
# a stop string or stop token; length: max_tokens or the context filled;
# repetition: the engine cut a repeating pattern short. These three are
# finished samples. abort (the request was aborted) and error (a request-level
# engine failure) are failed samples: their text is partial or empty.
FINISHED_OK = ("stop", "length", "repetition")
FAILED = ("abort", "error")

# What OpenAI-style servers report besides vLLM's own reasons.
_OPENAI_REASONS = {"tool_calls": "stop", "function_call": "stop", "content_filter": "abort"}


def finish_outcome(raw: object) -> tuple[FinishReason, str | None]:
    """Our finish reason for a backend's raw one, and a detail when it was not
    reported as is (unknown or missing reasons become "error", never raise)."""
    reason = str(raw) if raw is not None else None
    if reason in FINISHED_OK or reason in FAILED:
        return reason, None  # type: ignore[return-value]
    if reason in _OPENAI_REASONS:
        return _OPENAI_REASONS[reason], f"finish_reason {reason!r}"  # type: ignore[return-value]
    if reason is None:
        return "error", "the engine returned an unfinished sample (no finish_reason)"
    return "error", f"unknown finish_reason {reason!r}"


class Completion(BaseModel):
    """One sampled continuation. `completion_tokens` counts the generated ids
    up to and including EOS, or up to the token that completed a stop string.

    `finish_reason` is one of FINISHED_OK (a usable sample) or FAILED (abort,
    error: the sample did not finish and its text is partial); `detail` says
    more when the backend's own reason was mapped or the sample failed.
    """

    text: str
    finish_reason: FinishReason
    completion_tokens: int = Field(ge=0)
    detail: str | None = None

    @property
    def failed(self) -> bool:
        """True when the sample was aborted or hit an engine error."""
        return self.finish_reason in FAILED


class GenerationResult(BaseModel):
    """The completions of one request, with the prompt's token count."""

    request_id: str
    prompt_tokens: int = Field(ge=0)
    completions: list[Completion]

    @property
    def texts(self) -> list[str]:
        """The completion texts in sample order."""
        return [c.text for c in self.completions]

    @property
    def completion_tokens(self) -> int:
        """Generated tokens summed over all completions."""
        return sum(c.completion_tokens for c in self.completions)


class ModelBackend(ABC):
    """A model that turns a batch of requests into results, in request order."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Sample `request.sampling.n` completions for every request."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer gives `text`."""

    def context_length(self) -> int | None:
        """The model's context window in tokens (prompt + generation); None when unknown."""
        return getattr(self, "max_model_len", None)

    def count_prompts(self, requests: list[GenerationRequest]) -> list[int]:
        """Prompt tokens of each request as the engine encodes it (its chat template applied);
        a backend without a local tokenizer counts the message texts."""
        from .prompts import encode_prompt

        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            return [len(encode_prompt(tokenizer, r)) for r in requests]
        return [self.count_tokens(r.prompt if r.messages is None else "\n".join(m["content"] for m in r.messages))
                for r in requests]

    def close(self) -> None:  # noqa: B027 - optional: a backend may hold nothing
        """Release the model and any pools or connections."""

    def __enter__(self) -> "ModelBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_backend(config: BackendConfig) -> ModelBackend:
    """Build the backend named by `config.kind` (`BACKENDS`); heavy libraries load on first use."""
    return BACKENDS.create(config.kind, config)


BACKENDS: Registry = Registry("backend kind", {"hf": "stepforge.serve.hf_backend:HFBackend",
                                               "vllm": "stepforge.serve.vllm_backend:VLLMBackend",
                                               "openai": "stepforge.serve.openai_backend:OpenAIBackend"})
