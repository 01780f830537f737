"""OpenAI-compatible HTTP backend: `vllm serve`, llama.cpp, `stepforge serve`, hosted APIs.

Raw prompts go to the completions endpoint, chat messages to the chat
endpoint. Requests run concurrently on a bounded thread pool; each call has a
timeout and is retried with exponential backoff on 429, 5xx and connection
errors, so a batch never hangs: it finishes or raises a `ServeError`.

A request's seed is forwarded; whether it reproduces is the server's
property (`vllm serve` repeats outputs only with batch invariance enabled,
`stepforge serve` as its backend does). Finish reasons are kept per choice.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .base import BackendConfig, Completion, GenerationRequest, GenerationResult, ModelBackend, finish_outcome
from .errors import (
    BackendUnavailableError,
    ConfigError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    ServeError,
)
from .prompts import apportion

MAX_BACKOFF_S = 30.0


def is_retryable(exc: BaseException) -> bool:
    """429, any 5xx, timeouts and connection failures are worth another try."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def backoff_delay(attempt: int, base_s: float, exc: BaseException | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): base * 2**attempt,
    at least the server's Retry-After, at most MAX_BACKOFF_S."""
    delay = base_s * (2**attempt)
    response = getattr(exc, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    return min(delay, MAX_BACKOFF_S)


def to_serve_error(exc: BaseException, base_url: str, model: str, attempts: int) -> ServeError:
    """Translate an openai client exception into our typed errors."""
    import openai

    if isinstance(exc, openai.APIConnectionError):
        kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
        return BackendUnavailableError(f"server {base_url} {kind} after {attempts} attempt(s): {exc}")
    if isinstance(exc, openai.APIStatusError):
        status, message = exc.status_code, _error_message(exc)
        if status == 429 or status >= 500:
            return BackendUnavailableError(f"server {base_url} answered {status} after {attempts} attempt(s): {message}")
        if status == 404:
            return ModelNotFoundError(f"server {base_url} does not serve model {model!r}: {message}")
        if status in (401, 403):
            return ConfigError(f"server {base_url} refused the API key ({status}): {message}")
        if _error_code(exc) == "context_length_exceeded" or any(k in message.lower() for k in _CONTEXT_HINTS):
            return PromptTooLongError(message)
        return InvalidRequestError(f"server {base_url} rejected the request ({status}): {message}")
    return GenerationError(f"request to {base_url} failed: {exc}")


_CONTEXT_HINTS = ("maximum context length", "context length", "context window")


def _error_code(exc: Any) -> str | None:
    body = getattr(exc, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    return inner.get("code") if isinstance(inner, dict) else None


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))


def call_with_retries(fn: Callable[[], Any], config: BackendConfig, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Run `fn`, retrying retryable failures up to `config.max_retries` times."""
    for attempt in range(config.max_retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_retryable(exc) or attempt == config.max_retries:
                raise to_serve_error(exc, config.base_url or "", config.model, attempt + 1) from None
            sleep(backoff_delay(attempt, config.backoff_s, exc))
    raise AssertionError("unreachable")


def completion_api_kwargs(request: GenerationRequest, model: str, extra_fields: bool = True) -> dict[str, Any]:
    """Keyword arguments of `client.completions.create` / `client.chat.completions.create`.

    Greedy requests ask for one choice at temperature 0 (vLLM's server
    rejects greedy with n > 1); the result repeats it. top_k and
    repetition_penalty, which the OpenAI API lacks, go in `extra_body`
    always, so a vLLM server never substitutes the checkpoint's
    generation_config values; with `extra_fields` false they must be off.
    """
    s = request.sampling
    kwargs: dict[str, Any] = {
        "model": model,
        "n": s.samples_to_draw,
        "temperature": 0.0 if s.greedy else s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
    }
    if extra_fields:
        kwargs["extra_body"] = {"top_k": s.top_k or -1, "repetition_penalty": s.repetition_penalty}
    elif s.top_k or s.repetition_penalty != 1.0:
        raise InvalidRequestError(
            "top_k / repetition_penalty need extra body fields, which this backend is configured not to send "
            "(extra_sampling_fields: false)"
        )
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.stop:
        kwargs["stop"] = list(s.stop)
    if request.messages is not None:
        kwargs["messages"] = [dict(m) for m in request.messages]
    else:
        kwargs["prompt"] = request.prompt
    return kwargs


def response_to_result(request: GenerationRequest, response: Any) -> GenerationResult:
    """Map a completions or chat-completions response to our result.

    Prompt tokens come from `usage`. Per-completion tokens come from a
    choice's `completion_tokens` field when the server sends one (stepforge
    serve does); otherwise `usage.completion_tokens` is split over the choices
    in proportion to their text length (exact when n == 1).
    """
    choices = sorted(response.choices, key=lambda c: c.index)
    texts = [(c.message.content or "") if hasattr(c, "message") else (c.text or "") for c in choices]
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    per_choice = [(getattr(c, "model_extra", None) or {}).get("completion_tokens") for c in choices]
    if all(isinstance(t, int) for t in per_choice):
        counts = per_choice
    else:
        total = int(getattr(usage, "completion_tokens", 0) or 0)
        counts = apportion(total, [max(len(t), 1) for t in texts])
    completions = []
    for c, t, k in zip(choices, texts, counts):
        reason, detail = finish_outcome(c.finish_reason)
        completions.append(Completion(text=t, finish_reason=reason, completion_tokens=k, detail=detail))
    if request.sampling.greedy and len(completions) == 1:
        completions = [completions[0].model_copy() for _ in range(request.sampling.n)]
    if len(completions) != request.sampling.n:
        raise GenerationError(f"server returned {len(completions)} choices, expected {request.sampling.n}")
    return GenerationResult(request_id=request.request_id, prompt_tokens=prompt_tokens, completions=completions)


class OpenAIBackend(ModelBackend):
    """A remote OpenAI-compatible server behind the backend interface."""

    def __init__(self, config: BackendConfig):
        import openai

        self.config = config
        self.client = openai.OpenAI(
            base_url=config.base_url, api_key=config.resolved_api_key(), timeout=config.timeout_s, max_retries=0
        )
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="openai-backend")
        self._tokenizer = None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Send the requests concurrently (at most `max_concurrency` in flight)."""
        futures = [self._pool.submit(self._generate_one, r) for r in requests]
        return [f.result() for f in futures]

    def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        kwargs = completion_api_kwargs(request, self.config.model, self.config.extra_sampling_fields)
        create = self.client.chat.completions.create if request.is_chat else self.client.completions.create
        response = call_with_retries(lambda: create(**kwargs), self.config)
        return response_to_result(request, response)

    def count_tokens(self, text: str) -> int:
        """Count with the configured local tokenizer, else the server's /tokenize
        endpoint (served by vLLM and by stepforge serve)."""
        if self.config.tokenizer:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer, local_files_only=True)
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._remote_count(text)

    def _remote_count(self, text: str) -> int:
        import httpx

        root = (self.config.base_url or "").rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {self.config.resolved_api_key()}"}

        def post():
            r = httpx.post(
                f"{root}/tokenize",
                json={"model": self.config.model, "prompt": text, "add_special_tokens": False},
                headers=headers,
                timeout=self.config.timeout_s,
            )
            r.raise_for_status()
            return r.json()

        try:
            return int(post()["count"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise BackendUnavailableError(
                f"cannot count tokens: set `tokenizer` to a local tokenizer dir, or serve /tokenize at {root} ({exc})"
            ) from None

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
