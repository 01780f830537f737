"""Prompt rendering and completion post-processing shared by local backends."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import GenerationRequest
from .errors import InvalidRequestError, PromptTooLongError


def render_prompt(tokenizer, request: GenerationRequest) -> str:
    """The text the model sees: the raw prompt, or the chat template applied to
    the messages with the assistant turn opened (`add_generation_prompt`)."""
    if request.messages is None:
        return request.prompt or ""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("the model's tokenizer has no chat template; send a raw prompt")
    return tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, request: GenerationRequest) -> list[int]:
    """Token ids of the prompt. A rendered chat template already holds its
    special tokens, so only raw prompts get the tokenizer's own (e.g. BOS)."""
    text = render_prompt(tokenizer, request)
    ids = list(tokenizer(text, add_special_tokens=not request.is_chat)["input_ids"])
    if not ids:
        raise InvalidRequestError("the prompt is empty (it encodes to zero tokens)")
    return ids


def new_token_budget(prompt_len: int, max_tokens: int, max_model_len: int | None) -> int:
    """Tokens that may be generated: `max_tokens`, capped by the context window.

    Raises PromptTooLongError when not even one token fits after the prompt.
    """
    if max_model_len is None:
        return max_tokens
    if prompt_len >= max_model_len:
        raise PromptTooLongError(
            f"prompt has {prompt_len} tokens but the model's context is {max_model_len} tokens"
        )
    return min(max_tokens, max_model_len - prompt_len)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Truncate `text` before the earliest occurrence of any stop string."""
    best = -1
    for stop in stops:
        pos = text.find(stop)
        if pos != -1 and (best == -1 or pos < best):
            best = pos
    if best == -1:
        return text, False
    return text[:best], True


def tokens_to_stop(decode: Callable[[Sequence[int]], str], ids: Sequence[int], stops: Sequence[str]) -> int:
    """Smallest k such that `decode(ids[:k])` contains a stop string.

    Prefix decodes only grow, so containment is monotone in k and a binary
    search finds the token that completed the stop string. Returns len(ids)
    when no stop string occurs.
    """

    def hit(k: int) -> bool:
        text = decode(ids[:k])
        return any(stop in text for stop in stops)

    if not stops or not hit(len(ids)):
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` into integer parts proportional to `weights`, summing to `total`."""
    if not weights:
        return []
    wsum = sum(weights)
    if wsum <= 0:
        base, extra = divmod(total, len(weights))
        return [base + (1 if i < extra else 0) for i in range(len(weights))]
    raw = [total * w / wsum for w in weights]
    parts = [int(r) for r in raw]
    order = sorted(range(len(weights)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
