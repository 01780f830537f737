"""Data passed between the loop, the proposers (LLM or search) and training.

These records are the contract between `loop/` (Algorithm 1, agents, buffer),
the search proposer and `training/`. Keep them small and serialisable.
Requests carry the parsed `Task` (benchmark/schema.py); `task_ir` is the
text a model sees (the task's YAML without its impl and metadata), rendered
once per task object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

from pydantic import BaseModel, Field

from stepforge.benchmark.schema import Task
from stepforge.benchmark.verdict import Verdict

_IR_CACHE: dict[int, tuple[Task, str]] = {}
_IR_CACHE_LIMIT = 4096


def task_ir(task: Task) -> str:
    """The task as a model sees it: its YAML without `impl` and metadata (rendered once per task object)."""
    hit = _IR_CACHE.get(id(task))
    if hit is not None and hit[0] is task:
        return hit[1]
    text = task.to_yaml(include_impl=False, include_meta=False)
    if len(_IR_CACHE) >= _IR_CACHE_LIMIT:
        _IR_CACHE.clear()
    _IR_CACHE[id(task)] = (task, text)
    return text


class _HasTask(BaseModel):
    task: Task

    @property
    def task_ir(self) -> str:
        """`task_ir(self.task)`."""
        return task_ir(self.task)


class Demonstration(_HasTask):
    """A solved task shown to a proposer: the task and its earned impl (never the task file's own)."""

    task_key: str
    impl: str  # closed mode: the program; open mode: the candidate YAML (its earned fns and impl)
    success_rate: float = 1.0  # fraction of samples that were correct when it was earned
    round: int = 0
    mode: str = "closed"


class RepairTurn(BaseModel):
    """One earlier turn of a repair conversation: the proposer's reply, the program verified, its verdict."""

    reply: str  # the proposer's raw reply (what the model said)
    program: str | None = None  # the program the verifier scored (after the guardian); None: nothing parsed
    verdict: Verdict


class ProposalRequest(_HasTask):
    """Ask for `n` candidate programs for one task.

    `history` is the repair conversation so far (oldest first): a follow-up
    request asks for a new candidate after the verifier rejected the last one.
    """

    task_key: str
    demonstrations: list[Demonstration] = Field(default_factory=list)
    n: int = 1
    temperature: float = 0.7
    seed: int = 0
    history: list[RepairTurn] = Field(default_factory=list)
    mode: str = "closed"  # open: the task is posed without its fns; the answer is a candidate (fns + impl)
    round: int = 0  # Algorithm 1's round (a search proposer may give later rounds a larger budget)


class Proposal(BaseModel):
    """One candidate: the raw reply and what it cost, or why the request produced none (`error`)."""

    raw: str  # model text (to be parsed leniently) or a search-made program; "" when `error` is set
    error: str | None = None  # the request failed for this sample (e.g. its prompt is too long)
    messages: list[dict[str, str]] | None = None  # the chat prompt sent (None for search)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    # what a proposer without tokens spent on this proposal (the search: its share of the request's
    # expansions and candidates); summed per round by the report
    cost: dict[str, float] = Field(default_factory=dict)
    dropped: list[str] = Field(default_factory=list)  # demonstrations left out to fit the context (easiest first)


class Proposer(ABC):
    """Anything that writes candidate programs: an LLM agent or the search."""

    name: str = "proposer"
    takes_feedback: bool = True  # False: the loop runs no repair turns with it (it would ignore `history`)

    @abstractmethod
    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        """One list of up to `n` proposals per request, in request order."""


class StreamingProposer(Proposer):
    """A proposer that can give one request's proposals one at a time, each only when asked for.

    The executor uses `iter_proposals` to stop a request (and the task's
    other requests of the step) once a verified sample is correct, so a
    streaming proposer spends no work on samples that are not needed.
    """

    @abstractmethod
    def iter_proposals(self, request: ProposalRequest) -> Iterator[Proposal]:
        """Up to `request.n` proposals, lazily; the work for each is done when it is asked for."""


class BufferEntry(BaseModel):
    """An earned experience: the selected correct program of a solved task."""

    task_key: str
    impl: str  # the program, or in open mode the candidate YAML (fns + impl)
    success_count: int
    n_samples: int
    success_rate: float  # its difficulty: low = hard
    round: int
    temperature: float
    messages: list[dict[str, str]] | None = None  # the proposer prompt it was earned from
    step: int = 0  # Algorithm 1's group index j within the round it was earned in
    demonstrations: list[str] = Field(default_factory=list)  # task keys shown when it was earned
    # None: earned in this run; else a seeded entry (`seed_buffer`), naming the buffer file it came from
    source: str | None = None
    mode: str = "closed"


class GuardRequest(_HasTask):
    """Ask a guardian to make one candidate program obey the affine rule."""

    task_key: str
    program: str  # the proposal's program text (already extracted from the reply); open mode: the candidate
    temperature: float = 0.0
    seed: int = 0
    mode: str = "closed"  # open: only the candidate's impl is repaired, its fns are kept


class GuardResult(BaseModel):
    program: str  # the repaired program (unchanged when nothing was needed)
    changed: bool = False
    messages: list[dict[str, str]] | None = None  # the chat prompt sent (LLM guardian only)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Guardian(ABC):
    """Repairs global constraints (each stream consumed once)."""

    name: str = "guardian"

    @abstractmethod
    def repair(self, requests: list[GuardRequest]) -> list[GuardResult]:
        """One result per request, in order."""
