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

Context: with a backend that knows its context window, each request keeps
the hardest-first prefix of its demonstrations whose prompt (the model's own
count) leaves `max_tokens` for the answer (loop/agents/packing.py); the
demonstrations left out are named in `Proposal.dropped` (and in the sample
records as `dropped_demonstrations`). A request whose prompt fills the
context even without demonstrations fails alone, before anything is sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from stepforge.loop.agents.knowledge import Knowledge, load_knowledge
from stepforge.loop.agents.packing import fit_demonstrations
from stepforge.loop.agents.prompts import STYLES, proposer_messages, repair_messages
from stepforge.loop.interfaces import Proposal, ProposalRequest, Proposer
from stepforge.serve.base import GenerationRequest, GenerationResult, SamplingParams
from stepforge.serve.errors import InvalidRequestError, PromptTooLongError

log = logging.getLogger(__name__)

# Errors that belong to one request (its prompt), not to the backend: the rest of a batch still runs.
REQUEST_ERRORS = (PromptTooLongError, InvalidRequestError)


def generate_isolated(backend: Any, requests: list[GenerationRequest]) -> tuple[list[Optional[GenerationResult]], dict[int, str]]:
    """Generate a batch; if a request-level error stops it, split it in halves and retry each, so only
    the bad requests fail and one bad prompt costs a few calls, not one engine call per request."""
    if not requests:
        return [], {}
    try:
        results = backend.generate(requests)
    except REQUEST_ERRORS as exc:
        if len(requests) == 1:
            return [None], {0: f"{type(exc).__name__}: {exc}"}
        half = len(requests) // 2
        first, first_errors = generate_isolated(backend, requests[:half])
        second, second_errors = generate_isolated(backend, requests[half:])
        return first + second, {**first_errors, **{half + i: why for i, why in second_errors.items()}}
    if len(results) != len(requests):
        raise RuntimeError(f"the backend returned {len(results)} results for {len(requests)} requests")
    return list(results), {}


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

    def messages_for(self, request: ProposalRequest, keep: Optional[int] = None) -> list[dict[str, str]]:
        """The chat prompt with the first `keep` demonstrations (all by default), in the request's mode,
        then the repair conversation (`request.history`) if any."""
        demos = request.demonstrations if keep is None else request.demonstrations[:keep]
        first = proposer_messages(self.knowledge, demos, request.task, style=self.style, mode=request.mode)
        return first + repair_messages(request.history)

    def count_prompt_tokens(self, requests: list[ProposalRequest]) -> list[int]:
        """The prompt tokens each request costs, counted by the backend's tokenizer (`count_prompts`)."""
        counts = self.backend.count_prompts([self.generation_request(r, i) for i, r in enumerate(requests)])
        return [int(c) for c in counts]

    def generation_request(self, request: ProposalRequest, index: int = 0, keep: Optional[int] = None) -> GenerationRequest:
        return GenerationRequest(
            messages=self.messages_for(request, keep),
            sampling=SamplingParams(n=request.n, temperature=request.temperature, top_p=self.top_p,
                                    seed=request.seed, max_tokens=self.max_tokens, stop=self.stop),
            request_id=f"{request.task_key}#{index}",
        )

    def _fit(self, requests: list[ProposalRequest], live: list[int]) -> tuple[list[int], dict[int, str]]:
        """Demonstrations each live request keeps so its prompt leaves `max_tokens` of the context,
        and the requests whose prompt fills the context even without any (never sent)."""
        sizes = [len(requests[i].demonstrations) for i in live]
        context = self.backend.context_length() if hasattr(self.backend, "context_length") else None
        if context is None or not live:
            return sizes, {}
        try:
            fits = fit_demonstrations(self.backend.count_prompts,
                                      lambda j, k: self.generation_request(requests[live[j]], live[j], k),
                                      sizes, max(context - self.max_tokens, 1))
        except REQUEST_ERRORS:  # e.g. no chat template: the backend reports it per request when generating
            return sizes, {}
        too_long = {j: f"PromptTooLongError: the prompt has {f.prompt_tokens} tokens without demonstrations; "
                       f"the model's context is {context}" for j, f in enumerate(fits) if f.prompt_tokens >= context}
        return [f.keep for f in fits], too_long

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        live = [i for i, r in enumerate(requests) if r.n >= 1]
        keeps, too_long = self._fit(requests, live)
        gen = [self.generation_request(requests[i], i, k) for i, k in zip(live, keeps)]
        dropped = [[d.task_key for d in requests[i].demonstrations[k:]] for i, k in zip(live, keeps)]
        sent = [j for j in range(len(gen)) if j not in too_long]
        t0 = time.perf_counter()
        got, got_errors = generate_isolated(self.backend, [gen[j] for j in sent])
        elapsed = time.perf_counter() - t0
        results: list[Optional[GenerationResult]] = [None] * len(gen)
        errors = dict(too_long)
        for pos, j in enumerate(sent):
            results[j] = got[pos]
            if pos in got_errors:
                errors[j] = got_errors[pos]
        total_tokens = sum(c.completion_tokens for r in results if r is not None for c in r.completions)
        total_samples = sum(len(r.completions) for r in results if r is not None)
        out: list[list[Proposal]] = [[] for _ in requests]
        for j, (i, res) in enumerate(zip(live, results)):
            if res is None:
                why = errors.get(j, "no result")
                log.warning("proposer: task %s got no proposals: %s", requests[i].task_key, why)
                out[i] = [Proposal(raw="", error=why, messages=gen[j].messages, dropped=dropped[j])] * requests[i].n
                continue
            messages = gen[j].messages
            for c in res.completions[: requests[i].n]:
                share = (c.completion_tokens / total_tokens) if total_tokens else (1 / max(total_samples, 1))
                out[i].append(Proposal(raw=c.text, messages=messages, prompt_tokens=res.prompt_tokens,
                                       completion_tokens=c.completion_tokens, seconds=elapsed * share,
                                       dropped=dropped[j]))
        return out


def make_proposer(backend: Any, knowledge: Optional[Knowledge] = None, **options) -> LLMProposer:
    """An LLMProposer (options: style, max_tokens, top_p, stop)."""
    return LLMProposer(backend, knowledge, **options)


__all__ = ["LLMProposer", "REQUEST_ERRORS", "generate_isolated", "make_proposer"]
