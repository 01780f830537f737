"""The experience buffer D of Algorithm 1: earned programs, their difficulty, stratification.

- `earn(task, records, ...)` is Algorithm 1's `filter(B)` for one solved
  task: its correct programs of one step (every temperature) are
  deduplicated by AST isomorphism, the shortest is kept, and its success
  rate is correct / total samples of that task in that step.
- `stratify(entries, m)` splits D into at most m groups by difficulty,
  hardest first: entries sorted by success rate (ascending: solved by few
  samples = hard), ties by the round they were earned in and then the task
  key, cut into m contiguous groups of near-equal size (the larger groups
  first, as `numpy.array_split` does). Empty groups are left out, so a
  buffer with fewer than m entries has fewer groups.
- `demonstration_sets(groups, cap)` gives the cumulative demonstration sets
  d_j = E_0 + ... + E_j (capped at `cap` entries, the hardest kept), without
  consecutive repeats (a capped or empty set would repeat the same prompt);
  an empty buffer gives one empty set.
- `read_seed_buffer(path)` reads another run's buffer (a run directory or a
  buffer.jsonl) as seeded entries for `seed_buffer` (each marked with its
  `source`); see `loop/config.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from stepforge.benchmark.schema import Task
from stepforge.errors import StepforgeError, short_text
from stepforge.loop.interfaces import BufferEntry, Demonstration


def difficulty_order(entries: Iterable[BufferEntry]) -> list[BufferEntry]:
    """Hardest first: by success rate, then earlier round, then task key."""
    return sorted(entries, key=lambda e: (e.success_rate, e.round, e.task_key))


def stratify(entries: Sequence[BufferEntry], m: int) -> list[list[BufferEntry]]:
    """At most m non-empty groups of near-equal size, hardest group first."""
    if m < 1:
        raise ValueError(f"granularity m must be >= 1, got {m}")
    ordered = difficulty_order(entries)
    size, extra = divmod(len(ordered), m)
    groups, start = [], 0
    for j in range(m):
        end = start + size + (1 if j < extra else 0)
        if end > start:
            groups.append(ordered[start:end])
        start = end
    return groups


def demonstration_sets(groups: Sequence[Sequence[BufferEntry]], cap: Optional[int] = None) -> list[list[BufferEntry]]:
    """Cumulative sets E_0, E_0+E_1, ...; capped; consecutive repeats dropped; [[]] for no groups."""
    sets: list[list[BufferEntry]] = []
    acc: list[BufferEntry] = []
    for group in groups:
        acc = acc + list(group)
        d = acc if cap is None else acc[:cap]
        if not sets or [e.task_key for e in d] != [e.task_key for e in sets[-1]]:
            sets.append(list(d))
    return sets or [[]]


def select_program(programs: Sequence[str]) -> tuple[str, int]:
    """Deduplicate by AST isomorphism, keep the shortest: (program, distinct programs).

    Uses `loop/dedup.py` (`dedup`: the first of every canonical class;
    `select_shortest`: fewest statements, then characters, then the first).
    `programs` come in a deterministic order (temperature, then sample
    index), so the choice is reproducible.
    """
    from stepforge.loop.dedup import dedup, select_shortest

    if not programs:
        raise ValueError("select_program needs at least one program")
    unique = dedup(list(programs))
    best = select_shortest(unique)
    return (best if best is not None else unique[0]), len(unique)


def earn(task_key: str, correct: Sequence[tuple[str, float, Optional[list[dict[str, str]]]]], n_samples: int,
         round_: int, step: int = 0, demonstrations: Sequence[str] = (), mode: str = "closed") -> BufferEntry:
    """filter(B) for one task: `correct` holds (program, temperature, prompt messages) of its correct samples
    (open mode: candidates, deduplicated with their fns)."""
    if not correct:
        raise ValueError(f"task {task_key}: no correct sample to earn")
    program, _ = select_program([p for p, _, _ in correct])
    temperature, messages = next((t, m) for p, t, m in correct if p == program)
    return BufferEntry(
        task_key=task_key,
        impl=program,
        success_count=len(correct),
        n_samples=n_samples,
        success_rate=len(correct) / n_samples if n_samples else 0.0,
        round=round_,
        temperature=temperature,
        messages=messages,
        step=step,
        demonstrations=list(demonstrations),
        mode=mode,
    )


class ExperienceBuffer:
    """D: one entry per solved task, in the order they were earned."""

    def __init__(self, entries: Iterable[BufferEntry] = ()):
        self._entries: dict[str, BufferEntry] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: BufferEntry) -> None:
        if entry.task_key in self._entries:
            raise ValueError(f"task {entry.task_key} is already in the buffer")
        self._entries[entry.task_key] = entry

    def __contains__(self, task_key: str) -> bool:
        return task_key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries.values())

    @property
    def entries(self) -> list[BufferEntry]:
        return list(self._entries.values())

    def stratify(self, m: int) -> list[list[BufferEntry]]:
        return stratify(self.entries, m)

    @staticmethod
    def demonstrations(entries: Sequence[BufferEntry], tasks: dict[str, Task]) -> list[Demonstration]:
        """The entries as prompt demonstrations (IR without impl, plus the earned impl)."""
        return [Demonstration(task_key=e.task_key, task=tasks[e.task_key], impl=e.impl,
                              success_rate=e.success_rate, round=e.round, mode=e.mode) for e in entries]


class SeedBufferError(StepforgeError, ValueError):
    """A seed buffer that cannot be read; the text names the file (and line)."""


def seed_buffer_file(path: str | Path) -> Path:
    """The buffer file `path` names: a run directory's buffer.jsonl, or the file itself."""
    path = Path(path).expanduser()
    return path / "buffer.jsonl" if path.is_dir() else path


def read_seed_buffer(path: str | Path) -> list[BufferEntry]:
    """The entries of a buffer file (or a run directory's), as seeded entries: `source` is set to the
    file they were read from unless already set (an entry that was itself seeded keeps its origin)."""
    from pydantic import ValidationError

    from stepforge.config_io import read_text_file, validation_problems

    file = seed_buffer_file(path)
    if not file.is_file():
        what = "no buffer.jsonl in the run directory" if Path(path).expanduser().is_dir() else "no such file"
        raise SeedBufferError(f"{file}: {what}")
    try:
        text = read_text_file(file, "seed buffer")
    except StepforgeError as exc:
        raise SeedBufferError(str(exc)) from None
    out: list[BufferEntry] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = BufferEntry.model_validate(json.loads(line))
        except ValidationError as exc:
            key, problem = validation_problems(exc, BufferEntry)[0]
            raise SeedBufferError(f"{file}: line {number}: not a buffer entry: {key or '(top level)'}: "
                                  f"{problem}") from None
        except (ValueError, RecursionError) as exc:
            why = "nested too deep" if isinstance(exc, RecursionError) else short_text(exc, 80)
            raise SeedBufferError(f"{file}: line {number}: not a buffer entry: not JSON ({why})") from None
        if entry.task_key in seen:
            raise SeedBufferError(f"{file}: line {number}: task {entry.task_key} appears twice")
        seen.add(entry.task_key)
        out.append(entry if entry.source else entry.model_copy(update={"source": str(file.resolve())}))
    return out


__all__ = [
    "ExperienceBuffer",
    "SeedBufferError",
    "demonstration_sets",
    "difficulty_order",
    "earn",
    "read_seed_buffer",
    "seed_buffer_file",
    "select_program",
    "stratify",
]
