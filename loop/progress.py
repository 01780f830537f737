"""Progress of a running loop: the `Events` callbacks, a rich progress bar and a log-line printer.

Proposers spend different things: models spend tokens, the search spends
expansions; each line shows what was spent.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from stepforge.loop.runstore import SampleRecord


def spend_text(records_tokens: int, cost: dict[str, float], seconds: float) -> str:
    """What a step spent, as a rate: tokens for models, expansions (and candidates) for the search."""
    seconds = max(seconds, 1e-6)
    if records_tokens or not cost:
        return f"{records_tokens / seconds:.0f} tok/s"
    return f"{cost.get('expansions', 0) / seconds:.0f} expansions/s, {cost.get('candidates', 0):.0f} candidates"


def add_cost(total: dict[str, float], records: Sequence[SampleRecord]) -> None:
    """Add the records' `cost` into `total`."""
    for rec in records:
        for key, value in rec.cost.items():
            total[key] = total.get(key, 0.0) + value


class Events:
    """Callbacks of a running step (the default does nothing)."""

    def step_started(self, round_: int, step: int, demonstrations: Sequence[str], tasks: Sequence[str],
                     total: int, done: int, done_correct: int) -> None:
        pass

    def samples_recorded(self, records: Sequence[SampleRecord]) -> None:
        pass

    def step_finished(self, round_: int, step: int, solved: Sequence[str], unsolved: int) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress(Events):
    """A rich progress bar per step: samples, passes, tasks done, what was spent (tokens/s or expansions/s)."""

    def __init__(self, n_tasks: int, console: Any = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.n_tasks = n_tasks
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("pass {task.fields[passed]}"), TextColumn("tasks {task.fields[tasks]}"),
                                 TextColumn("{task.fields[spent]}"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.solved = 0
        self._bar = None
        self._tokens = 0
        self._cost: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._tasks_done: set[str] = set()
        self._by_task: dict[str, int] = {}
        self._per_task = 0

    def step_started(self, round_, step, demonstrations, tasks, total, done, done_correct) -> None:
        self._tokens, self._cost, self._t0 = 0, {}, time.monotonic()
        self._by_task = {}
        self._tasks_done = set()
        self._per_task = total // max(len(tasks), 1)
        self._bar = self.progress.add_task(f"round {round_} step {step} ({len(demonstrations)} demos)",
                                           total=total, completed=done, passed=done_correct,
                                           tasks=f"{self.solved}/{self.n_tasks}", spent="-")

    def samples_recorded(self, records) -> None:
        if self._bar is None:
            return
        self._tokens += sum(r.completion_tokens for r in records)
        add_cost(self._cost, records)
        spent = spend_text(self._tokens, self._cost, time.monotonic() - self._t0)
        passed = self.progress.tasks[-1].fields["passed"] + sum(1 for r in records if r.correct)
        self.progress.update(self._bar, advance=len(records), passed=passed, spent=spent)

    def step_finished(self, round_, step, solved, unsolved) -> None:
        self.solved += len(solved)
        if self._bar is not None:
            self.progress.update(self._bar, tasks=f"{self.solved}/{self.n_tasks}")
        self._bar = None

    def close(self) -> None:
        self.progress.stop()


class LogProgress(Events):
    """One line per step on stderr (for logs and non-terminals)."""

    def __init__(self, n_tasks: int, stream: Any = None):
        self.stream = stream or sys.stderr
        self.n_tasks = n_tasks
        self.solved = 0
        self._samples = self._correct = self._tokens = 0
        self._cost: dict[str, float] = {}
        self._t0 = time.monotonic()

    def step_started(self, round_, step, demonstrations, tasks, total, done, done_correct) -> None:
        self._samples, self._correct, self._tokens, self._t0 = done, done_correct, 0, time.monotonic()
        self._cost = {}
        print(f"round {round_} step {step}: {len(tasks)} tasks, {len(demonstrations)} demonstrations, "
              f"{total} samples ({done} already recorded)", file=self.stream, flush=True)

    def samples_recorded(self, records) -> None:
        self._samples += len(records)
        self._correct += sum(1 for r in records if r.correct)
        self._tokens += sum(r.completion_tokens for r in records)
        add_cost(self._cost, records)

    def step_finished(self, round_, step, solved, unsolved) -> None:
        self.solved += len(solved)
        secs = time.monotonic() - self._t0
        print(f"round {round_} step {step}: {self._samples} samples, {self._correct} correct, "
              f"solved {len(solved)} new ({self.solved}/{self.n_tasks}), {unsolved} unsolved, "
              f"{spend_text(self._tokens, self._cost, secs)}, {secs:.1f} s", file=self.stream, flush=True)
