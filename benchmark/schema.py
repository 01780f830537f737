"""Task files: the structural IR of docs/task-format.md, as pydantic models.

A task file is one YAML mapping with the keys of the spec (`test_name`,
`global`, `inputs`, `parameters`, `fns`, `outputs`, `impl`) and stepforge's
optional keys (`group`, `description`, `bindings`, `tolerance`, and for open
mode `open` and `vocabulary`, see docs/language.md section 5a); see docs/task-format.md.
`load_task` reads one file, `load_benchmark` the whole benchmark keyed by
`<group>/<test_name>`. Every problem with a file is a `TaskFileError` that
names the file, the key path (`fns[2].init`) and what was expected; callers
never see a raw pydantic or YAML traceback.

`Task.to_yaml()` writes the same schema back, code as literal `|` blocks:
this is the prompt format the model sees (without `impl`) and the format of
earned solutions (with it). Loading what `to_yaml` wrote gives an equal Task.

Decisions the spec leaves open (tested by the schema tests in tests/benchmark):
- code blocks (`global`, `apply`, `data_transform`, `impl`) are normalised on
  load: common indentation removed, trailing spaces and blank edge lines
  dropped, one final newline. This is what makes the YAML round trip exact.
- `data_transform` and `init` keep the form the file used (a bare value for
  one field, or a list), so a dump reproduces the author's file.
- unknown keys are errors (a typo such as `fn:` for `fns:` must not silently
  drop a task's functions); so are duplicate keys, alias bombs, nesting past
  a depth bound and text that is not UTF-8 (the shared reader, config_io).
- `func_name` must be unique (programs use it); `name` may repeat.
- Python syntax of every code block is checked on load (its line is named);
  dtypes and dims are parsed with the simulator's own parsers.

The code is in three modules by job: task_decls.py (the parts of a task and
their field checks), task_model.py (the `Task`, its identity and YAML output),
task_loading.py (reading text, files and the benchmark). This module is the
public face: import from here.
"""

from __future__ import annotations

from stepforge.benchmark.task_decls import (
    DATA_GENS,
    GROUP_ORDER,
    TASKS_ROOT,
    FnDecl,
    InputDecl,
    MultihotGen,
    OutputDecl,
    ParameterDecl,
    StreamDecl,
    TaskFileError,
    Tolerance,
    Vocabulary,
    normalise_code,
)
from stepforge.benchmark.task_loading import load_benchmark, load_task, resolve_task, task_from_dict
from stepforge.benchmark.task_model import Task

__all__ = [
    "DATA_GENS",
    "FnDecl",
    "GROUP_ORDER",
    "InputDecl",
    "MultihotGen",
    "OutputDecl",
    "ParameterDecl",
    "StreamDecl",
    "TASKS_ROOT",
    "Task",
    "TaskFileError",
    "Tolerance",
    "Vocabulary",
    "load_benchmark",
    "load_task",
    "normalise_code",
    "resolve_task",
    "task_from_dict",
]
