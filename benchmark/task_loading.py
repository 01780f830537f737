"""Task files, part 3: reading them (one file, text, a mapping, the whole benchmark).

YAML goes through the shared bounded reader (`config_io.read_yaml_text`:
duplicate keys, alias bombs, nesting depth and non-UTF-8 text are refused);
every problem becomes a `TaskFileError` naming the file, the key path and
what was expected, in the wording every config of stepforge shares
(`config_io.validation_problems`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stepforge.benchmark.task_decls import (
    GROUP_ORDER,
    TASKS_ROOT,
    TaskFileError,
)
from stepforge.benchmark.task_model import Task
from stepforge.config_io import YamlError, read_yaml_text, validation_problems

# ---------------------------------------------------------------------------
# loading


def _task_from_text(text: str | bytes, source: str) -> Task:
    try:
        data = read_yaml_text(text, source)
    except YamlError as exc:
        raise TaskFileError(source, [(exc.where, exc.problem)]) from None
    return task_from_dict(data, source)


def task_from_dict(data: Any, source: str = "<task>") -> Task:
    """Validate a mapping (e.g. parsed YAML) into a Task; TaskFileError on any problem."""
    if not isinstance(data, dict):
        raise TaskFileError(source, [("", f"expected a mapping of task keys (test_name, inputs, fns, outputs, ...) "
                                          f"at the top level, got {type(data).__name__}")])
    try:
        return Task.model_validate(data).with_source(source)
    except ValidationError as exc:
        raise TaskFileError(source, validation_problems(exc, Task)) from None


def load_task(path: str | Path) -> Task:
    """Load one task file; TaskFileError naming the file on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskFileError(path, [("", f"cannot read the file: {exc.strerror or exc}")]) from None
    return _task_from_text(data, str(path))


def load_benchmark(root: str | Path | None = None) -> dict[str, Task]:
    """Every `<root>/<group>/<test_name>.yaml`, keyed `<group>/<test_name>`, in a stable order.

    Groups come in docs/benchmark.md's order (others alphabetically after them),
    tasks by test_name within a group. A file's `group` key, if present, must
    match its folder, and its `test_name` its file name.
    """
    root = Path(root) if root is not None else TASKS_ROOT
    if not root.is_dir():
        raise TaskFileError(root, [("", "the benchmark folder does not exist")])
    groups = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
                    key=lambda p: (GROUP_ORDER.index(p.name) if p.name in GROUP_ORDER else len(GROUP_ORDER), p.name))
    tasks: dict[str, Task] = {}
    for group_dir in groups:
        for path in sorted(group_dir.glob("*.yaml")):
            task = load_task(path)
            if task.group is None:
                task = task.model_copy(update={"group": group_dir.name})
            elif task.group != group_dir.name:
                raise TaskFileError(path, [("group", f"expected {group_dir.name!r} (the folder), got {task.group!r}")])
            if task.test_name != path.stem:
                raise TaskFileError(path, [("test_name", f"expected {path.stem!r} (the file name), got {task.test_name!r}")])
            tasks[task.key] = task
    return tasks


def resolve_task(key_or_path: str | Path, root: str | Path | None = None) -> Task:
    """A benchmark key (`norm/G_0_8_01`), a unique test_name, or a path to a task file."""
    text = str(key_or_path)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return load_task(path)
    tasks = load_benchmark(root)
    if text in tasks:
        return tasks[text]
    matches = [t for t in tasks.values() if t.test_name == text]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise KeyError(f"{text!r} names {len(matches)} tasks: {', '.join(t.key for t in matches)}; use <group>/<id>")
    raise KeyError(f"no task {text!r}; keys look like {next(iter(tasks), 'group/id')} (see `stepforge tasks`)")

