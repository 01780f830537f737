"""Request bodies of the OpenAI-compatible HTTP API, and their conversion
into `GenerationRequest`s."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import GenerationRequest, SamplingParams, check_temperature


class _SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(default=1, ge=1, le=256)
    temperature: float = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extra field; 0 or -1 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # vLLM's extra field
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)

    @model_validator(mode="after")
    def _no_stream(self):
        if self.stream:
            raise ValueError("stream=true is not supported by this server")
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        """Our sampling settings for this body."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
        )


class CompletionBody(_SamplingBody):
    """POST /v1/completions: one prompt or a list of prompts."""

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)

    def to_requests(self) -> list[GenerationRequest]:
        """One request per prompt."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [GenerationRequest(prompt=p, sampling=self.sampling(self.max_tokens), request_id=str(i)) for i, p in enumerate(prompts)]


class ChatMessage(BaseModel):
    """A chat message with plain-text content."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: str


class ChatBody(_SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def to_requests(self, default_max_tokens: int) -> list[GenerationRequest]:
        """The single chat request of this body."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return [GenerationRequest(messages=messages, sampling=self.sampling(max_tokens), request_id="0")]


class TokenizeBody(BaseModel):
    """POST /tokenize (vLLM's extension): count the tokens of a prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
