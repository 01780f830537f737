"""The one backend interface: requests and results, and the backend factory.

Every backend (transformers, vLLM, OpenAI-compatible HTTP, a Ray pool of any
of them) takes a batch of `GenerationRequest`s and returns one
`GenerationResult` per request, in request order, with exact token counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .config import BackendConfig, load_backend_config  # re-exported

__all__ = [
    "BackendConfig",
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "ModelBackend",
    "SamplingParams",
    "load_backend_config",
    "make_backend",
]


class SamplingParams(BaseModel):
    """How to sample: n completions per prompt, temperature 0 means greedy.

    `seed` makes a request reproducible on the same backend and model; `stop`
    strings end a completion and are never part of its text.
    """

    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, ge=1)
    seed: int | None = None
    stop: list[str] = []

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


class Completion(BaseModel):
    """One sampled continuation. `completion_tokens` counts the generated ids
    up to and including EOS, or up to the token that completed a stop string."""

    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int = Field(ge=0)


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

    def close(self) -> None:  # noqa: B027 - optional: a backend may hold nothing
        """Release the model and any pools or connections."""

    def __enter__(self) -> "ModelBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_backend(config: BackendConfig) -> ModelBackend:
    """Build the backend named by `config.kind`; heavy libraries load lazily."""
    if config.kind == "hf":
        from .hf_backend import HFBackend

        return HFBackend(config)
    if config.kind == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(config)
    if config.kind == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(config)
    raise ValueError(f"unknown backend kind {config.kind!r}")  # unreachable: validated
