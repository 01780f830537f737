"""Data passed between the loop, the proposers (LLM or search) and training.

These records are the contract between `loop/` (driver, agents, buffer),
the search proposer and `training/`. Keep them small and serialisable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pydantic import BaseModel, Field


class Demonstration(BaseModel):
    """A solved task shown to a proposer: its structural IR and its earned impl."""

    task_key: str
    task_ir: str  # the task's YAML without `impl`
    impl: str
    success_rate: float = 1.0  # fraction of samples that were correct when it was earned
    round: int = 0


class ProposalRequest(BaseModel):
    """Ask for `n` candidate programs for one task."""

    task_key: str
    task_ir: str  # YAML without `impl`, as the model sees it
    demonstrations: list[Demonstration] = Field(default_factory=list)
    n: int = 1
    temperature: float = 0.7
    seed: int = 0


class Proposal(BaseModel):
    """One candidate: the raw reply and what it cost, or why the request produced none (`error`)."""

    raw: str  # model text (to be parsed leniently) or a search-made program; "" when `error` is set
    error: str | None = None  # the request failed for this sample (e.g. its prompt is too long)
    messages: list[dict[str, str]] | None = None  # the chat prompt sent (None for search)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class Proposer(ABC):
    """Anything that writes candidate programs: an LLM agent or the search."""

    name: str = "proposer"

    @abstractmethod
    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        """One list of up to `n` proposals per request, in request order."""


class BufferEntry(BaseModel):
    """An earned experience: the selected correct program of a solved task."""

    task_key: str
    impl: str
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


class GuardRequest(BaseModel):
    """Ask a guardian to make one candidate program obey the affine rule."""

    task_key: str
    task_ir: str
    program: str  # the proposal's program text (already extracted from the reply)
    temperature: float = 0.0
    seed: int = 0


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
