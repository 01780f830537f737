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

from stepforge.loop.agents.guardians import NoGuardian, RuleGuardian, make_guardian
from stepforge.loop.agents.knowledge import Knowledge, load_knowledge
from stepforge.loop.agents.prompts import STYLES, guardian_messages, proposer_messages
from stepforge.loop.agents.replies import extract_program_with_reason
from stepforge.loop.interfaces import Guardian, GuardRequest, GuardResult, Proposal, ProposalRequest, Proposer
from stepforge.serve.base import GenerationRequest, GenerationResult, SamplingParams
from stepforge.serve.errors import InvalidRequestError, PromptTooLongError

log = logging.getLogger(__name__)

# Errors that belong to one request (its prompt), not to the backend: the rest of a batch still runs.
REQUEST_ERRORS = (PromptTooLongError, InvalidRequestError)


def _generate_isolated(backend: Any, requests: list[GenerationRequest]) -> tuple[list[Optional[GenerationResult]], dict[int, str]]:
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
        return proposer_messages(self.knowledge, request.demonstrations, request.task_ir, style=self.style)

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
        results, errors = _generate_isolated(self.backend, gen)
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


class LLMGuardian(Guardian):
    """Prompts a model with the affine rule, worked repairs and the proposal; takes the program from its reply.

    As published, it is asked about every proposal and may corrupt a correct
    program; `only_violations=True` asks only about programs that parse and
    break the rule. If the reply holds no usable program (or the request
    fails), the original program is kept (`changed=False`).
    """

    name = "llm"

    def __init__(
        self,
        backend: Any,
        knowledge: Optional[Knowledge] = None,
        *,
        max_tokens: int = 1024,
        temperature: Optional[float] = None,
        only_violations: bool = False,
    ):
        self.backend = backend
        self.knowledge = knowledge or load_knowledge()
        self.max_tokens = max_tokens
        self.temperature = temperature  # None: each request's own temperature
        self.only_violations = only_violations
        self.last_reasons: list[str] = []  # per request of the last call: why the original was kept ("" if not)

    def _needs_model(self, program: str) -> bool:
        if not self.only_violations:
            return True
        from stepforge.simulator import ProgramSyntaxError, check_affine, parse_program

        try:
            return bool(check_affine(parse_program(program)))
        except ProgramSyntaxError:
            return False

    def repair(self, requests: list[GuardRequest]) -> list[GuardResult]:
        results: list[Optional[GuardResult]] = [None] * len(requests)
        self.last_reasons = [""] * len(requests)
        todo = [i for i, r in enumerate(requests) if self._needs_model(r.program)]
        for i, r in enumerate(requests):
            if i not in todo:
                results[i] = GuardResult(program=r.program, changed=False)
                self.last_reasons[i] = "not sent: the program obeys the rule or does not parse"
        gen = []
        for i in todo:
            r = requests[i]
            temperature = self.temperature if self.temperature is not None else r.temperature
            gen.append(GenerationRequest(
                messages=guardian_messages(r.task_ir, r.program, self.knowledge),
                sampling=SamplingParams(n=1, temperature=temperature, seed=r.seed, max_tokens=self.max_tokens),
                request_id=f"{r.task_key}#guard{i}",
            ))
        outs, errors = _generate_isolated(self.backend, gen)
        for j, (i, res) in enumerate(zip(todo, outs)):
            r = requests[i]
            messages = gen[j].messages
            if res is None:
                results[i] = GuardResult(program=r.program, changed=False, messages=messages)
                self.last_reasons[i] = errors.get(j, "no result")
                continue
            text = res.completions[0].text if res.completions else ""
            found, reason = extract_program_with_reason(text)
            program, changed = r.program, False
            if found is None:
                self.last_reasons[i] = reason
            elif _normalised(found.program) != _normalised(r.program):
                program, changed = found.program, True
            results[i] = GuardResult(program=program, changed=changed, messages=messages,
                                     prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens)
        return [r for r in results if r is not None]


def _normalised(program: str) -> str:
    return "\n".join(line.rstrip() for line in program.strip().splitlines())


def make_proposer(backend: Any, knowledge: Optional[Knowledge] = None, **options) -> LLMProposer:
    """An LLMProposer (options: style, max_tokens, top_p, stop)."""
    return LLMProposer(backend, knowledge, **options)


__all__ = ["LLMGuardian", "LLMProposer", "NoGuardian", "REQUEST_ERRORS", "RuleGuardian", "make_guardian", "make_proposer"]
