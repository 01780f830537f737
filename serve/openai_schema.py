"""Request bodies of the OpenAI-compatible HTTP API, validated strictly at the
edge, and their conversion into `GenerationRequest`s.

Types are strict (no `true` or `"1"` for an integer, no `1` for a boolean),
text must be valid UTF-8 (no lone surrogates), stop strings are non-empty and
bounded, seeds fit what `torch.manual_seed` accepts, and the server's
`ServerLimits` (given as validation context) bound n, max_tokens and the number
of prompts. Bodies are parsed with `parse_body`, which raises pydantic's
`ValidationError` for every problem, with the offending field in its `loc`.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from .base import GenerationRequest, SamplingParams, check_temperature

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_NAME_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.manual_seed accepts
DEFAULT_CHAT_MAX_TOKENS = 512


class ServerLimits(BaseModel):
    """Bounds a server enforces (set by `stepforge serve` flags): per request,
    and on the units (samples) queued over all requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_n: int = Field(default=64, ge=1)
    max_tokens: int = Field(default=4096, ge=1)
    max_prompts: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1024**2, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_queued_units: int = Field(default=16384, ge=1)


DEFAULT_LIMITS = ServerLimits()


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_utf8)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_utf8)]


def _limits(info: ValidationInfo) -> ServerLimits:
    context = info.context or {}
    return context.get("limits", DEFAULT_LIMITS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _SamplingBody(_Strict):
    model: Name | None = None
    n: int = Field(default=1, ge=1)
    temperature: float = 1.0  # checked by check_temperature (vLLM's own range and greedy rule)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extra field; 0 or -1 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # vLLM's extra field
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False

    @field_validator("stop", "prompt", mode="before", check_fields=False)
    @classmethod
    def _one_or_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)

    @field_validator("n")
    @classmethod
    def _n_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_n
        if value > limit:
            raise ValueError(f"n must be at most {limit} on this server")
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_tokens
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit} on this server")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("stream=true is not supported by this server")
        return value

    def sampling(self, max_tokens: int) -> SamplingParams:
        """Our sampling settings for this body."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
        )


class CompletionBody(_SamplingBody):
    """POST /v1/completions: one prompt or a list of prompts (kept as a list)."""

    prompt: Annotated[list[Text], Field(min_length=1)]
    max_tokens: int = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_limit(cls, value, info: ValidationInfo):
        limit = _limits(info).max_prompts
        if len(value) > limit:
            raise ValueError(f"at most {limit} prompts per request on this server")
        return value

    def to_requests(self) -> list[GenerationRequest]:
        """One request per prompt."""
        sampling = self.sampling(self.max_tokens)
        return [GenerationRequest(prompt=p, sampling=sampling, request_id=str(i)) for i, p in enumerate(self.prompt)]


class ChatMessage(_Strict):
    """A chat message with plain-text content."""

    role: Name
    content: Text


class ChatBody(_SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def to_requests(self, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> list[GenerationRequest]:
        """The single chat request of this body."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return [GenerationRequest(messages=messages, sampling=self.sampling(max_tokens), request_id="0")]


class TokenizeBody(_Strict):
    """POST /tokenize (vLLM's extension): count the tokens of a prompt."""

    model: Name | None = None
    prompt: Text


Body = TypeVar("Body", bound=BaseModel)


def parse_body(kind: type[Body], raw: bytes, limits: ServerLimits = DEFAULT_LIMITS) -> Body:
    """Parse and validate a JSON request body; raises pydantic's ValidationError."""
    return kind.model_validate_json(raw, context={"limits": limits})


def error_param(loc: tuple) -> str | None:
    """The top-level request field an error location names (OpenAI's `param`)."""
    for part in loc:
        if isinstance(part, str) and part in _FIELDS:
            return part
    return None


_FIELDS: frozenset[str] = frozenset(
    name for body in (CompletionBody, ChatBody, TokenizeBody) for name in body.model_fields
)
