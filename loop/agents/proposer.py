"""The LLM agents: a proposer that writes candidate programs and a guardian that
repairs the affine rule (docs/design.md "Agents").

Both talk to any object with `generate(list[GenerationRequest]) ->
list[GenerationResult]`: a `ModelBackend` (transformers, vLLM, OpenAI-style
HTTP) or the Ray `ModelPool`. One call carries the whole batch, so a backend
can batch it and share the prompt prefix (vLLM prefix caching).

Token and time accounting of a proposal: `prompt_tokens` is the prompt's
count for every sample drawn from it (the prompt each sample was conditioned
on), `completion_tokens` the sample's own; `seconds` is the batch's wall time
shared among its samples in proportion to their completion tokens (equally
when none were generated).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from stepforge.loop.agents.knowledge import Knowledge, load_knowledge
from stepforge.loop.agents.prompts import STYLES, proposer_messages
from stepforge.loop.interfaces import Proposal, ProposalRequest, Proposer
from stepforge.serve.base import GenerationRequest, GenerationResult, SamplingParams
from stepforge.serve.errors import InvalidRequestError, PromptTooLongError

log = logging.getLogger(__name__)

# Errors that belong to one request (its prompt), not to the backend: the rest of a batch still runs.
REQUEST_ERRORS = (PromptTooLongError, InvalidRequestError)


def generate_isolated(backend: Any, requests: list[GenerationRequest]) -> tuple[list[Optional[GenerationResult]], dict[int, str]]:
    """Generate a batch; if a request-level error stops it, retry one by one so only the bad requests fail."""
    if not requests:
        return [], {}
    try:
        results = backend.generate(requests)
    except REQUEST_ERRORS:
        results = None
    if results is not None:
        if len(results) != len(requests):
            raise RuntimeError(f"the backend returned {len(results)} results for {len(requests)} requests")
        return list(results), {}
    out: list[Optional[GenerationResult]] = []
    errors: dict[int, str] = {}
    for i, req in enumerate(requests):
        try:
            (res,) = backend.generate([req])
            out.append(res)
        except REQUEST_ERRORS as exc:
            out.append(None)
            errors[i] = f"{type(exc).__name__}: {exc}"
    return out, errors


class LLMProposer(Proposer):
    """Prompts a model with knowledge + demonstrations + the task; one Proposal per sampled completion."""

    name = "llm"

    def __init__(
        self,
        backend: Any,
        knowledge: Optional[Knowledge] = None,
        *,
        style: str = "ir",
        max_tokens: int = 1024,
        top_p: float = 1.0,
        stop: Optional[Sequence[str]] = None,
    ):
        if style not in STYLES:
            raise ValueError(f"unknown proposer style {style!r}; expected one of {', '.join(STYLES)}")
        self.backend = backend
        self.knowledge = knowledge or load_knowledge()
        self.style = style
        self.max_tokens = max_tokens
        self.top_p = top_p
        self.stop = list(stop or [])

    def messages_for(self, request: ProposalRequest) -> list[dict[str, str]]:
        return proposer_messages(self.knowledge, request.demonstrations, request.task, style=self.style,
                                 mode=request.mode)

    def generation_request(self, request: ProposalRequest, index: int = 0) -> GenerationRequest:
        return GenerationRequest(
            messages=self.messages_for(request),
            sampling=SamplingParams(n=request.n, temperature=request.temperature, top_p=self.top_p,
                                    seed=request.seed, max_tokens=self.max_tokens, stop=self.stop),
            request_id=f"{request.task_key}#{index}",
        )

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        live = [i for i, r in enumerate(requests) if r.n >= 1]
        gen = [self.generation_request(requests[i], i) for i in live]
        t0 = time.perf_counter()
        results, errors = generate_isolated(self.backend, gen)
        elapsed = time.perf_counter() - t0
        total_tokens = sum(c.completion_tokens for r in results if r is not None for c in r.completions)
        total_samples = sum(len(r.completions) for r in results if r is not None)
        out: list[list[Proposal]] = [[] for _ in requests]
        for j, (i, res) in enumerate(zip(live, results)):
            if res is None:
                why = errors.get(j, "no result")
                log.warning("proposer: task %s got no proposals: %s", requests[i].task_key, why)
                out[i] = [Proposal(raw="", error=why, messages=gen[j].messages)] * requests[i].n
                continue
            messages = gen[j].messages
            for c in res.completions[: requests[i].n]:
                share = (c.completion_tokens / total_tokens) if total_tokens else (1 / max(total_samples, 1))
                out[i].append(Proposal(raw=c.text, messages=messages, prompt_tokens=res.prompt_tokens,
                                       completion_tokens=c.completion_tokens, seconds=elapsed * share))
        return out


def make_proposer(backend: Any, knowledge: Optional[Knowledge] = None, **options) -> LLMProposer:
    """An LLMProposer (options: style, max_tokens, top_p, stop)."""
    return LLMProposer(backend, knowledge, **options)


__all__ = ["LLMProposer", "REQUEST_ERRORS", "generate_isolated", "make_proposer"]
