"""Guardians: agents that make a proposal obey the affine rule (each stream consumed once).

- `RuleGuardian`: a program transformation (`loop/agents/rule_repair.py`,
  docs/design.md "Agents") that inserts exactly the Copies a program needs.
- `LLMGuardian`: prompts a model with the rule, worked repairs and the proposal.
- `NoGuardian`: returns every program unchanged (the single-model baseline).

`GUARDIANS` names them for the config's `guardian.kind`; `make_guardian` builds one.

In open mode (`GuardRequest.mode`) a request's program is a candidate (fns +
impl YAML): every guardian repairs its impl and keeps its fns (the LLM
guardian is shown the task with the candidate's fns in place of the task's).
"""

from __future__ import annotations

from typing import Any, Optional

from stepforge.loop.agents.knowledge import Knowledge, load_knowledge
from stepforge.loop.agents.prompts import guardian_messages
from stepforge.loop.agents.proposer import generate_isolated
from stepforge.loop.agents.replies import extract_program_with_reason
from stepforge.loop.agents.rule_repair import RepairResult, repair_affine
from stepforge.loop.candidates import candidate_impl, parse_candidate, with_impl
from stepforge.loop.interfaces import Guardian, GuardRequest, GuardResult
from stepforge.registry import Registry
from stepforge.serve.base import GenerationRequest, SamplingParams


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
        todo = [i for i, r in enumerate(requests) if self._needs_model(candidate_impl(r.program))]
        for i, r in enumerate(requests):
            if i in todo and r.mode == "open" and parse_candidate(r.program) is None:
                todo.remove(i)
            if i not in todo:
                results[i] = GuardResult(program=r.program, changed=False)
                self.last_reasons[i] = "not sent: the program obeys the rule or does not parse"
        gen = []
        for i in todo:
            r = requests[i]
            temperature = self.temperature if self.temperature is not None else r.temperature
            gen.append(GenerationRequest(
                messages=guardian_messages(_with_candidate_fns(r), candidate_impl(r.program), self.knowledge),
                sampling=SamplingParams(n=1, temperature=temperature, seed=r.seed, max_tokens=self.max_tokens),
                request_id=f"{r.task_key}#guard{i}",
            ))
        outs, errors = generate_isolated(self.backend, gen)
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
            elif _normalised(found.program) != _normalised(candidate_impl(r.program)):
                program, changed = with_impl(r.program, found.program), True
            results[i] = GuardResult(program=program, changed=changed, messages=messages,
                                     prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens)
        return [r for r in results if r is not None]


def _with_candidate_fns(request: GuardRequest):
    """The request's task, in open mode with the candidate's fns in place of the task file's."""
    cand = parse_candidate(request.program) if request.mode == "open" else None
    if cand is None:
        return request.task
    from stepforge.benchmark.schema import FnDecl

    return request.task.model_copy(update={"fns": [FnDecl(**f.model_dump()) for f in cand.fns]})


def _normalised(program: str) -> str:
    return "\n".join(line.rstrip() for line in program.strip().splitlines())


class RuleGuardian(Guardian):
    """Inserts exactly the Copies the affine rule needs; never changes a program's meaning."""

    name = "rule"

    def repair(self, requests: list[GuardRequest]) -> list[GuardResult]:
        out = []
        for req in requests:
            result = repair_affine(candidate_impl(req.program))
            program = with_impl(req.program, result.program) if result.changed else req.program
            out.append(GuardResult(program=program, changed=result.changed))
        return out


class NoGuardian(Guardian):
    """Returns every program unchanged (the single-model baseline)."""

    name = "none"

    def repair(self, requests: list[GuardRequest]) -> list[GuardResult]:
        return [GuardResult(program=req.program, changed=False) for req in requests]


GUARDIANS: Registry[type[Guardian]] = Registry("guardian kind", {
    "rule": RuleGuardian, "llm": LLMGuardian, "none": NoGuardian})


def make_guardian(kind: str, backend=None, **options) -> Guardian:
    """`rule`, `none`, or `llm` (needs `backend`, any object with `generate`; `options` go to LLMGuardian)."""
    if kind == "llm":
        if backend is None:
            raise ValueError("the LLM guardian needs a backend (an object with generate(list[GenerationRequest]))")
        return LLMGuardian(backend, **options)
    if kind not in GUARDIANS:
        raise ValueError(f"unknown guardian kind {kind!r}; expected one of: {', '.join(GUARDIANS.names())}")
    return GUARDIANS.create(kind)


__all__ = [
    "GUARDIANS",
    "LLMGuardian",
    "NoGuardian",
    "RepairResult",
    "RuleGuardian",
    "make_guardian",
    "repair_affine",
]
