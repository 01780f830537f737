"""Run budgets (`budget: {tokens, samples, wall_s}`) and the estimate a run prints before its first request.

A `BudgetMeter` counts what a run has spent, in the order Algorithm 1 makes
its requests (samples replayed from disk on `--resume` count like new ones,
so a resumed run reaches the same point):

- `samples`: sample records, every repair turn included. The limit is exact:
  the loop hands the executor only as many samples as are left
  (`BudgetMeter.trim`), the rest of a request is generated with it (requests
  are seeded as a whole) but not recorded.
- `tokens`: proposer prompt tokens (each request's prompt once, as the
  metrics count them), completion tokens and guardian tokens. Checked after
  each executor call (one step's first turns, or one repair turn), so a run
  may pass it by at most that call's tokens.
- `wall_s`: seconds since this process started the loop (a resumed run gets
  the budget afresh), checked like `tokens`.

`Estimate` is round 0's first turns, which are known before anything is
generated: its requests and samples, its prompt tokens counted by the
backend's tokenizer (`count_prompt_tokens`; None for a proposer without one),
and the most the settings allow. `check_covers_round0` refuses a budget that
cannot pay for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from stepforge.errors import StepforgeError
from stepforge.loop.runstore import request_id


class BudgetError(StepforgeError):
    """A budget that cannot cover round 0 (the run refuses to start)."""


class BudgetReached(Exception):
    """Raised inside the loop when a budget is spent; `reason` says which and by how much."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class BudgetMeter:
    """What a run has spent against its budget (any limit may be None: unlimited)."""

    tokens: Optional[int] = None
    samples: Optional[int] = None
    wall_s: Optional[float] = None

    def __post_init__(self):
        self.samples_used = 0
        self.tokens_used = 0
        self._requests: set[tuple] = set()
        self.started = time.perf_counter()

    @classmethod
    def from_config(cls, budget) -> "BudgetMeter":
        return cls(tokens=budget.tokens, samples=budget.samples, wall_s=budget.wall_s)

    def add(self, records: Iterable[Any]) -> None:
        """Count recorded samples (new or replayed)."""
        for rec in records:
            self.samples_used += 1
            rid = request_id(rec)
            if rid not in self._requests:
                self._requests.add(rid)
                self.tokens_used += int(rec.prompt_tokens)
            self.tokens_used += int(rec.completion_tokens + rec.guard_prompt_tokens + rec.guard_completion_tokens)

    def trim(self, jobs: list) -> tuple[list, bool]:
        """The jobs cut to the samples left (a partly allowed job skips its last indices); True if cut."""
        if self.samples is None:
            return jobs, False
        left = self.samples - self.samples_used
        out = []
        for job in jobs:
            wanted = [i for i in (range(job.n) if job.index is None else [job.index]) if i not in job.skip]
            if left <= 0:
                return out, True
            if len(wanted) > left:
                job.skip = frozenset(job.skip | set(wanted[left:]))  # only a first-turn job has n > 1
                out.append(job)
                return out, True
            left -= len(wanted)
            out.append(job)
        return out, False

    def spent(self) -> Optional[str]:
        """Why the token or wall budget is spent, or None."""
        if self.tokens is not None and self.tokens_used >= self.tokens:
            return f"budget.tokens: {self.tokens_used} tokens spent of {self.tokens}"
        elapsed = time.perf_counter() - self.started
        if self.wall_s is not None and elapsed >= self.wall_s:
            return f"budget.wall_s: {elapsed:.1f} s of {self.wall_s:g}"
        return None

    def samples_reason(self) -> str:
        return f"budget.samples: {self.samples_used} samples of {self.samples}"


# ---------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class Estimate:
    """Round 0's first turns, and the most the settings allow."""

    requests: int
    samples: int  # round 0, first turns
    prompt_tokens: Optional[int]  # round 0's first prompts by the backend's tokenizer (None: no tokenizer)
    max_completion_tokens: Optional[int]  # round 0's first turns at max_tokens each
    max_samples: int  # every step of every round, every repair turn
    max_steps: int
    repair_turns: int

    def lines(self) -> list[str]:
        prompt = "unknown (the proposer has no tokenizer)" if self.prompt_tokens is None else str(self.prompt_tokens)
        completion = "-" if self.max_completion_tokens is None else str(self.max_completion_tokens)
        out = [f"estimate: round 0 sends {self.requests} requests for {self.samples} samples, "
               f"{prompt} prompt tokens, at most {completion} completion tokens",
               f"estimate: the settings allow at most {self.max_samples} samples ({self.max_steps} step(s) x "
               f"{self.samples} first turns x {1 + self.repair_turns} turn(s))"]
        if self.repair_turns:
            out.append(f"estimate: repair turns add up to {self.repair_turns} follow-up request(s) per failed "
                       "sample, each its first prompt plus the conversation so far")
        return out


def round0_requests(tasks: dict[str, Any], settings) -> list:
    """The proposal requests of round 0's first turns (no demonstrations), as the loop makes them."""
    from stepforge.loop.executor import SampleJob, derive_seed

    return [SampleJob(round=0, step=0, task=k, spec=t, temperature=float(temp), n=settings.n,
                      seed=derive_seed(settings.seed, 0, 0, k, float(temp))).request()
            for k, t in tasks.items() for temp in settings.temperatures]


def estimate(proposer: Any, tasks: dict[str, Any], settings, max_tokens: Optional[int] = None) -> Estimate:
    """Round 0's cost, with prompt tokens from the proposer's `count_prompt_tokens` when it has one."""
    requests = round0_requests(tasks, settings)
    samples = len(requests) * settings.n
    count = getattr(proposer, "count_prompt_tokens", None)
    prompt = int(sum(count(requests))) if callable(count) else None
    steps = 1 + (settings.rounds_limit - 1) * settings.granularity if settings.adaptive else 1
    return Estimate(requests=len(requests), samples=samples, prompt_tokens=prompt,
                    max_completion_tokens=samples * max_tokens if max_tokens else None,
                    max_samples=steps * samples * (1 + settings.repair_turns), max_steps=steps,
                    repair_turns=settings.repair_turns)


def check_covers_round0(est: Estimate, budget, where: str = "config") -> None:
    """BudgetError (with the numbers) when the budget cannot pay for round 0's first turns."""
    problems = []
    if budget.samples is not None and budget.samples < est.samples:
        problems.append(f"budget.samples={budget.samples} is less than round 0's {est.samples} samples")
    if budget.tokens is not None and est.prompt_tokens is not None and budget.tokens < est.prompt_tokens:
        problems.append(f"budget.tokens={budget.tokens} is less than round 0's {est.prompt_tokens} prompt tokens "
                        f"(up to {est.prompt_tokens + (est.max_completion_tokens or 0)} with completions)")
    if problems:
        raise BudgetError(f"{where}: " + "; ".join(problems) + "; the run would stop before round 0 ends")


__all__ = ["BudgetError", "BudgetMeter", "BudgetReached", "Estimate", "check_covers_round0", "estimate",
           "round0_requests"]
