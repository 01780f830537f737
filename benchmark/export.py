"""Export a task and a solution as a standalone pytest file (`stepforge export`).

The file embeds the task's YAML (without its reference impl) and the program,
and checks them with stepforge's verifier: one test per size binding for the
numbers, one for the affine rule. It needs only an installed stepforge.

An open-mode solution (`open_mode=True`, docs/language.md section 5a) is a candidate, its
own fns and impl as YAML: the file embeds the candidate, fns included, and
checks it with `verify_open`, which interprets the fns with the fn language
(the exported file never runs them as Python).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from stepforge.benchmark.schema import Task

_TEMPLATE = '''"""Standalone check of a STeP program for task {key} (written by `stepforge export`).

Run with `pytest {filename}`; it needs the stepforge package (its verifier and
simulator) and nothing else. The task's structural IR and the program are
embedded below.
"""

import pytest

from stepforge.benchmark.schema import Task
{verify_import}

TASK_YAML = {task_yaml}

IMPL = {impl}

SEEDS = {seeds!r}

TASK = Task.from_yaml(TASK_YAML, source="<exported task {key}>")
BINDINGS = [{{}}] + [dict(b) for b in TASK.bindings]


def _label(binding):
    return " ".join(f"{{k}}={{v}}" for k, v in binding.items()) or "defaults"


@pytest.mark.parametrize("binding", BINDINGS, ids=[_label(b) for b in BINDINGS])
def test_program_matches_the_oracle(binding):
    verdict = {verify}(TASK, IMPL, seeds=SEEDS, bindings=[binding], check_affine=False)
    assert verdict.functional_ok, f"{{verdict.stage}}: {{verdict.message}}"


def test_program_obeys_the_affine_rule():
    verdict = {verify}(TASK, IMPL, seeds=SEEDS[:1], bindings=[{{}}])
    assert verdict.affine_ok, f"{{verdict.stage}}: {{verdict.message}}"
'''


def py_string(text: str) -> str:
    """A Python literal for `text`: a readable triple-quoted block when that is exact, else repr()."""
    if '"""' not in text and "\\" not in text and not text.endswith('"') \
            and all(ch == "\n" or ch.isprintable() for ch in text):
        return '"""\\\n' + text + '"""'
    return repr(text)


def export_test(task: Task, impl: str, seeds: Sequence[int] = (0, 1, 2), filename: str = "test_step.py",
                open_mode: bool = False) -> str:
    """The text of a standalone pytest file checking `impl` against `task` (open mode: `impl` is a
    candidate with its fns, checked against it as it is; ValueError if it is not one)."""
    if open_mode:
        from stepforge.benchmark.open_mode import CandidateError, load_candidate

        try:
            impl = load_candidate(impl).to_yaml()
        except CandidateError as exc:
            raise ValueError(f"not an open candidate: {exc}") from None
    return _TEMPLATE.format(
        verify_import=("from stepforge.benchmark.open_mode import verify_open" if open_mode
                       else "from stepforge.benchmark.verifier import verify"),
        verify="verify_open" if open_mode else "verify",
        key=task.key,
        filename=filename,
        task_yaml=py_string(task.to_yaml(include_impl=False)),
        impl=py_string(impl),
        seeds=tuple(int(s) for s in seeds),
    )


def write_export(task: Task, impl: str, out: str | Path, seeds: Sequence[int] = (0, 1, 2),
                 open_mode: bool = False) -> Path:
    """Write the pytest file (parents created); returns its path."""
    out = Path(out)
    if not re.match(r"^test_.*\.py$|^.*_test\.py$", out.name):
        raise ValueError(f"{out.name}: pytest collects files named test_*.py or *_test.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = export_test(task, impl, seeds, out.name, open_mode)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["export_test", "py_string", "write_export"]
