"""Open mode (docs/language.md, section 5a): the candidate writes the fns too.

An open candidate is YAML with `fns` (task-file fn entries) and `impl`.
`load_candidate` reads it without running any of it (fn bodies are only
normalised here; the fn language parses them later). `verify_open` runs the
verifier with the candidate's fns, built by the fn-language interpreter with
the task's parameters and vocabulary, in place of the task's: a candidate
whose fns do not build fails at the `fns` stage, before `parse`.
`reference_candidate` is a task's own fns and impl as an open candidate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stepforge.benchmark.schema import FnDecl, Task, resolve_task
from stepforge.benchmark.task_decls import _code
from stepforge.benchmark.task_model import _Dumper, _fn_dict, _Literal
from stepforge.benchmark.verifier import DEFAULT_MAX_ELEMENTS, FnBuilder, Verdict, verify
from stepforge.config_io import YamlError, read_yaml_text, validation_problems
from stepforge.simulator.fnlang import make_open_fn

_FENCE = re.compile(r"```(?:yaml|yml)?[ \t]*\n(.*?)```", re.DOTALL)


class CandidateError(ValueError):
    """An open candidate that is not `{fns: [...], impl: ...}` YAML; `str()` is one line."""


class CandidateFn(FnDecl):
    """A candidate's fn entry: a task-file fn entry whose `apply` is model text, never compiled as Python."""

    @field_validator("apply", mode="before")
    @classmethod
    def _apply(cls, v):
        return _code(v, "a fn body for one element")


class OpenCandidate(BaseModel):
    """The candidate's fns and program."""

    model_config = ConfigDict(extra="forbid")

    fns: list[CandidateFn]
    impl: str

    @field_validator("impl", mode="before")
    @classmethod
    def _impl(cls, v):
        return _code(v, "the program (STeP statements ending in return)")

    @field_validator("fns")
    @classmethod
    def _unique(cls, v):
        names = [f.func_name for f in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"func_name {', '.join(repeated)} repeats; programs call fns by func_name")
        return v

    def to_yaml(self) -> str:
        """The candidate as the model would write it."""
        data = {"fns": [_fn_dict(f) for f in self.fns], "impl": _Literal(self.impl)}
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def load_candidate(text: str) -> OpenCandidate:
    """Parse an open candidate (bare YAML, or the first ```yaml block of a reply); CandidateError if malformed."""
    fenced = _FENCE.search(text)
    try:
        data = read_yaml_text(fenced.group(1) if fenced else text, "the candidate")
    except YamlError as exc:
        raise CandidateError(f"the candidate is not valid YAML: {exc.where}: {exc.problem}") from None
    if not isinstance(data, dict):
        raise CandidateError("the candidate must be a YAML mapping with the keys fns and impl")
    try:
        return OpenCandidate.model_validate(data)
    except ValidationError as exc:
        key, message = validation_problems(exc, OpenCandidate)[0]
        raise CandidateError(f"{key}: {message}" if key else message) from None


def reference_candidate(task: Task) -> OpenCandidate:
    """The task's own fns and reference impl, posed as an open candidate."""
    if not task.impl:
        raise ValueError(f"task {task.key} has no reference impl")
    return OpenCandidate(fns=[CandidateFn(**f.model_dump()) for f in task.fns], impl=task.impl)


def fn_builder(task: Task, candidate: OpenCandidate, max_elements: int = DEFAULT_MAX_ELEMENTS) -> FnBuilder:
    """Builds the candidate's fns from a binding's namespace, with the task's parameters and vocabulary.

    Its `key` names the candidate's fns, so the verifier builds them once per binding of the task.
    """
    parameters = [p.name for p in task.parameters]
    vocab = task.vocabulary.names() if task.vocabulary is not None else None

    def build(namespace: dict):
        return {f.func_name: make_open_fn(f.name, f.func_name, f.input_dtype, f.output_dtype, f.apply, f.init_list(),
                                          namespace=namespace, parameters=parameters, vocabulary=vocab,
                                          max_elements=max_elements)
                for f in candidate.fns}

    # what the built fns depend on besides the namespace: the verifier keeps them per binding by it
    build.key = ("open", json.dumps([f.model_dump() for f in candidate.fns], sort_keys=True), max_elements)
    return build


def verify_open(task: Union[Task, str, Path], candidate: Union[OpenCandidate, str], *,
                max_elements: int = DEFAULT_MAX_ELEMENTS, **verify_kwargs) -> Verdict:
    """Verify an open candidate (text or parsed) against `task`; a malformed candidate fails at `fns`.

    `verify_kwargs` are `verify`'s (seeds, bindings, engine, check_affine, cache): the
    task's inputs, oracles and tolerances come from the same cache as in closed mode.
    """
    if not isinstance(task, Task):
        task = resolve_task(task)
    if not task.open:
        raise ValueError(f"task {task.key} cannot be posed in open mode (open: false)")
    if isinstance(candidate, str):
        try:
            candidate = load_candidate(candidate)
        except CandidateError as exc:
            return Verdict(passed=False, stage="fns", message=str(exc), task=task.key)
    return verify(task, candidate.impl, max_elements=max_elements, fns=fn_builder(task, candidate, max_elements),
                  **verify_kwargs)


__all__ = ["CandidateError", "CandidateFn", "OpenCandidate", "fn_builder", "load_candidate", "reference_candidate",
           "verify_open"]
