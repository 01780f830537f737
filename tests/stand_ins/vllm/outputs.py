"""What `LLM.generate` returns: one `RequestOutput` per prompt, in prompt order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """The log probability of one token, its rank in the distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample. `token_ids` are every generated id (EOS, a stop token, and
    the token that completed a stop string included); `text` leaves stop
    strings out (unless include_stop_str_in_output) and special tokens out
    (skip_special_tokens). `stop_reason` is the stop string or stop token id
    that ended it, None for EOS or any other reason."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The samples of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Any = None
    num_cached_tokens: int | None = None
    metrics: Any = field(default=None, repr=False)
