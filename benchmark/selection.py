"""Choosing tasks: keys and globs, named splits, groups, difficulty and mode.

A task list (`tasks:` of an improve config, `split.train`/`split.test` of an
ablation, `stepforge tasks`) is one of

- a list of patterns: task keys (`norm/G_0_8_01`), unique test names, globs
  over keys (`moe-*/*`) or split names; the union, in benchmark order;
- one such pattern as a string (`tasks: published`);
- a mapping (`TaskSelection`): `{split, keys, groups, difficulty, mode}`,
  each key optional; the tasks that satisfy all of them.

Splits: `published` = the 26 tasks of the published benchmark (their keys in
PUBLISHED), `new` = every other task, `all` = every task. Split names are
reserved: they are read as splits, never as test names.

Difficulty (`easy`, `medium`, `hard`) is derived from the reference `impl`
(docs/task-format.md "Difficulty"): `hard` if it routes (Partition and Merge),
needs two or more Copies, or has 12 or more lines; `easy` if it has at most 6
lines and no Copy; `medium` otherwise. A task without an impl has none and
matches no difficulty filter.

Mode: `closed` = every task (each can be posed with its fns given); `open` =
the tasks that can be posed openly (a task file's `open: false` leaves it out).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import Field, ValidationError, field_validator

from stepforge.config_io import StrictModel
from stepforge.errors import ConfigError, short_repr

# The published 26-task benchmark (docs/benchmark.md), by key.
PUBLISHED: tuple[str, ...] = (
    "attention/G_0_4_01", "attention/G_0_6_01", "attention/G_0_9_01",
    "bmm/bmm_0", "bmm/bmm_1", "bmm/bmm_2",
    "gemm/G_0_6_02", "gemm/G_0_6_03", "gemm/G_0_7_01",
    "norm/G_0_16_01", "norm/G_0_8_01", "norm/G_0_9_02",
    "rope/G_0_3_02", "rope/G_0_3_03", "rope/G_0_4_01",
    "moe-index/G_0_13_02", "moe-index/G_0_3_03", "moe-index/G_0_3_04", "moe-index/G_0_7_03",
    "moe-expert/G_0_5_02", "moe-expert/G_0_6_05", "moe-expert/G_0_7_01",
    "moe-end-to-end/G_0_10", "moe-end-to-end/G_0_12_01", "moe-end-to-end/G_0_9_01", "moe-end-to-end/G_0_9_02",
)
SPLITS: tuple[str, ...] = ("published", "new", "all")
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
MODES: tuple[str, ...] = ("closed", "open")

Split = Literal["published", "new", "all"]
Difficulty = Literal["easy", "medium", "hard"]
Mode = Literal["closed", "open"]


# ---------------------------------------------------------------------------
# what a program is like


@dataclass(frozen=True)
class ProgramStats:
    """Statements (without the return), Copy operations, and whether it routes (Partition and Merge)."""

    lines: int
    copies: int
    routes: bool


def program_stats(impl: str) -> ProgramStats:
    """The stats of a STeP program (parsed, never run); ValueError-like ProgramError if it does not parse."""
    from stepforge.simulator.program import Apply, Comprehension, Return, parse_program

    program = parse_program(impl)
    ops = [st.call.op for st in program.statements if isinstance(st, (Apply, Comprehension))]
    lines = sum(1 for st in program.statements if not isinstance(st, Return))
    return ProgramStats(lines=lines, copies=ops.count("Copy"), routes="Partition" in ops and "Merge" in ops)


def difficulty_of_stats(stats: ProgramStats) -> str:
    """`easy`, `medium` or `hard` by the rule in the module docstring."""
    if stats.routes or stats.copies >= 2 or stats.lines >= 12:
        return "hard"
    if stats.lines <= 6 and stats.copies == 0:
        return "easy"
    return "medium"


def task_difficulty(task) -> Optional[str]:
    """The task's difficulty from its reference impl; None without one."""
    if not task.impl:
        return None
    return difficulty_of_stats(program_stats(task.impl))


def task_modes(task) -> tuple[str, ...]:
    """The modes a task can be posed in."""
    return MODES if getattr(task, "open", True) else ("closed",)


def split_of(key: str) -> str:
    """`published` or `new`."""
    return "published" if key in PUBLISHED else "new"


def group_of(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


# ---------------------------------------------------------------------------
# the selection


def _listify(v):
    return [v] if isinstance(v, str) else v


class TaskSelection(StrictModel):
    """`{split, keys, groups, difficulty, mode}`: the tasks satisfying every given key."""

    split: Split = "all"
    keys: list[str] = Field(default_factory=list)  # patterns as in a task list; empty: no restriction
    groups: list[str] = Field(default_factory=list)  # group names or globs (`moe-*`)
    difficulty: list[Difficulty] = Field(default_factory=list)
    mode: Optional[Mode] = None

    @field_validator("keys", "groups", "difficulty", mode="before")
    @classmethod
    def _lists(cls, v):
        return _listify(v)


TaskSpec = Union[list[str], TaskSelection]


def as_spec(value: Any) -> Any:
    """A task list's raw value normalised for a pydantic field of type TaskSpec (a string becomes a list,
    a mapping a TaskSelection; ValueError with one line otherwise)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        try:
            return TaskSelection.model_validate(dict(value))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            raise ValueError(f"{loc}: {err['msg']}" if loc else err["msg"]) from None
    return value


def _match(pattern: str, keys: Sequence[str], where: str) -> list[str]:
    if pattern in SPLITS:
        return [k for k in keys if pattern == "all" or split_of(k) == pattern]
    if any(ch in pattern for ch in "*?["):
        return [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    hits = [k for k in keys if k == pattern or k.rsplit("/", 1)[-1] == pattern]
    if len(hits) > 1 and pattern not in keys:
        raise ConfigError(f"{where}: {short_repr(pattern)} names {len(hits)} tasks ({', '.join(hits)}); "
                          f"expected a unique key such as {hits[0]}")
    return hits


def select_patterns(patterns: Sequence[str], keys: Sequence[str], where: str = "tasks") -> list[str]:
    """Keys matching any of `patterns` (keys, test names, globs, split names), in the order of `keys`.

    A pattern that matches nothing is an error naming it.
    """
    keys = list(keys)
    chosen: set[str] = set()
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"{where}[{i}]: expected a task key, glob (attention/*) or split "
                              f"({', '.join(SPLITS)}), got {short_repr(pattern)}")
        hits = _match(pattern.strip(), keys, f"{where}[{i}]")
        if not hits and pattern.strip() not in SPLITS:
            sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise ConfigError(f"{where}[{i}]: {short_repr(pattern.strip())} matches no task; expected a key or glob over "
                              f"the benchmark's keys ({sample}) or a split ({', '.join(SPLITS)})")
        chosen.update(hits)
    return [k for k in keys if k in chosen]


def select(spec: Any, tasks: Union[Sequence[str], Mapping[str, Any]], where: str = "tasks") -> list[str]:
    """The keys of `tasks` (keys, or key -> Task) that `spec` selects, in their order.

    `spec` is a pattern, a list of patterns, a mapping or a TaskSelection (see the module docstring).
    Difficulty and mode filters need the Task objects. A selection of no task is an error.
    """
    keys = list(tasks)
    try:
        spec = as_spec(spec)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(spec, TaskSelection):
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ConfigError(f"{where}: expected a task key, a list of keys/globs/splits or a mapping "
                              f"{{split, keys, groups, difficulty, mode}}, got {short_repr(spec)}")
        chosen = select_patterns(list(spec), keys, where)
        if not chosen:
            raise ConfigError(f"{where}: {list(spec)} selects no task")
        return chosen
    chosen = select_patterns([spec.split], keys, f"{where}.split")
    if spec.keys:
        hit = set(select_patterns(spec.keys, keys, f"{where}.keys"))
        chosen = [k for k in chosen if k in hit]
    if spec.groups:
        known = sorted({group_of(k) for k in keys})
        for i, g in enumerate(spec.groups):
            if not any(fnmatch.fnmatchcase(name, g) for name in known):
                raise ConfigError(f"{where}.groups[{i}]: {short_repr(g)} matches no group; the groups are {', '.join(known)}")
        chosen = [k for k in chosen if any(fnmatch.fnmatchcase(group_of(k), g) for g in spec.groups)]
    if spec.difficulty or spec.mode:
        if not isinstance(tasks, Mapping):
            raise TypeError("select: difficulty and mode filters need the tasks, not only their keys")
        if spec.difficulty:
            chosen = [k for k in chosen if task_difficulty(tasks[k]) in spec.difficulty]
        if spec.mode:
            chosen = [k for k in chosen if spec.mode in task_modes(tasks[k])]
    if not chosen:
        raise ConfigError(f"{where}: the selection {spec.model_dump(exclude_defaults=True)} matches no task")
    return chosen


def select_option(text: str, tasks: Union[Sequence[str], Mapping[str, Any]], where: str = "--tasks") -> list[str]:
    """`select` for a command-line value: comma-separated keys, globs and split names."""
    return select([p.strip() for p in text.split(",") if p.strip()], tasks, where)


__all__ = [
    "DIFFICULTIES",
    "MODES",
    "PUBLISHED",
    "ProgramStats",
    "SPLITS",
    "TaskSelection",
    "TaskSpec",
    "as_spec",
    "difficulty_of_stats",
    "group_of",
    "program_stats",
    "select_option",
    "select",
    "select_patterns",
    "split_of",
    "task_difficulty",
    "task_modes",
]
