"""Prompts of the proposer and guardian agents.

The texts live in `loop/agents/templates/*.txt` (`string.Template`, `$name`
placeholders); this module only fills them in.

Proposer prompt (chat messages), built so that every prompt of a round shares
one long prefix (vLLM prefix caching):

    system: role + base knowledge                      same for every prompt
    user:   demonstrations (each: task, then its impl),  same within a round
            the instruction,                             same for every prompt
            the target task (without impl)               differs

Two styles: `ir` shows tasks in the structural IR (task YAML without `impl`,
and without the metadata keys group/description/bindings/tolerance, which are
not part of docs/task-format.md and may describe the reference solution),
`python` shows the same tasks as generated Python modules (`task_as_python`),
to measure how many tokens the IR saves. Both ask for the same answer, the
STeP program, in a ```python block.
"""

from __future__ import annotations

import ast
import functools
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from stepforge.config_io import read_yaml_text
from stepforge.errors import ConfigError
from stepforge.loop.interfaces import Demonstration, RepairTurn, task_ir
from stepforge.simulator.fns import body_returns

if TYPE_CHECKING:  # pragma: no cover
    from stepforge.benchmark.schema import Task
    from stepforge.loop.agents.knowledge import Knowledge

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STYLES = ("ir", "python")


@functools.lru_cache(maxsize=None)
def load_template(name: str) -> string.Template:
    """A template file from `loop/agents/templates/` (`name` without `.txt`)."""
    return string.Template((TEMPLATES_DIR / f"{name}.txt").read_text(encoding="utf-8"))


def fill(name: str, **values: Any) -> str:
    """Fill template `name`; every placeholder must be given (KeyError otherwise)."""
    return load_template(name).substitute({k: str(v) for k, v in values.items()})


# ---------------------------------------------------------------------------
# tasks as text


def as_task(task: "Task | str | dict") -> "Task":
    """A Task from a Task, task YAML text or a mapping (TaskFileError if invalid)."""
    from stepforge.benchmark.schema import Task, task_from_dict

    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return task_from_dict(task)
    if isinstance(task, str):
        return Task.from_yaml(task)
    raise TypeError(f"expected a Task, task YAML or a mapping, got {type(task).__name__}")


def render_task_ir(task: "Task | str | dict", include_impl: bool = False, include_meta: bool = False) -> str:
    """The task in the structural IR, as the model sees it (no `impl` unless asked)."""
    return as_task(task).to_yaml(include_impl=include_impl, include_meta=include_meta)


_TOP_KEY = re.compile(r"^[^\s#]")


def strip_impl(task_ir: str) -> str:
    """`task_ir` without its `impl` key; the rest of the text is kept as it is."""
    try:
        data = read_yaml_text(task_ir, "the task IR")
    except ConfigError:
        return task_ir
    if not (isinstance(data, dict) and "impl" in data):
        return task_ir
    lines = task_ir.splitlines(keepends=True)
    out, skipping = [], False
    for line in lines:
        if re.match(r"^impl\s*:", line):
            skipping = True
            continue
        if skipping and _TOP_KEY.match(line):
            skipping = False
        if not skipping:
            out.append(line)
    text = "".join(out)
    try:
        stripped = read_yaml_text(text, "the task IR")
    except ConfigError:
        stripped = None
    if isinstance(stripped, dict) and "impl" not in stripped:
        return text
    from stepforge.benchmark.schema import TaskFileError

    try:  # an unusual layout (e.g. flow style): re-render the task
        return render_task_ir(task_ir, include_impl=False)
    except TaskFileError:  # not a valid task: the mapping without impl
        return yaml.safe_dump({k: v for k, v in data.items() if k != "impl"}, sort_keys=False)


def _python_dim(dim) -> str:
    """A symbolic Dim as a Python expression over the `<SYM>_value` names."""
    num = [str(dim.coeff.numerator)] if dim.coeff.numerator != 1 or not any(p > 0 for _, p in dim.powers) else []
    for name, power in dim.powers:
        num += [f"{name}_value"] * max(power, 0)
    den = [f"{name}_value" for name, power in dim.powers for _ in range(max(-power, 0))]
    if dim.coeff.denominator != 1:
        den.append(str(dim.coeff.denominator))
    text = " * ".join(num)
    if den:
        text = f"{text} // " + (den[0] if len(den) == 1 else "(" + " * ".join(den) + ")")
    return text


def _tensor_shape_code(dtype, dims) -> list[str]:
    """The tensor shape of each field of a stream, as Python expressions."""
    from stepforge.simulator import parse_dims, parse_dtype

    stream_axes = [_python_dim(d) for d in reversed(parse_dims(dims))]
    return [", ".join(stream_axes + [_python_dim(d) for d in f.elem_dims()]) for f in parse_dtype(dtype).fields()]


def _type_text(dtype) -> str:
    return "[" + ", ".join(dtype) + "]" if isinstance(dtype, list) else str(dtype)


def _gen_code(data_gen, shape: str) -> str:
    if isinstance(data_gen, str):
        return {
            "torch.rand": f"torch.rand({shape})",
            "torch.randn": f"torch.randn({shape})",
            "torch.ones": f"torch.ones({shape})",
            "binary": f"(torch.rand({shape}) < 0.5).float()",
        }[data_gen]
    return f"multihot({shape}, lo={data_gen.min}, hi={data_gen.max})"


_MULTIHOT_HELPER = '''
def multihot(*shape, lo, hi):
    """0/1 vectors along the last axis, each with lo..hi ones at random routes."""
    out = torch.zeros(*shape)
    for row in out.reshape(-1, shape[-1]):
        row[torch.randperm(shape[-1])[: int(torch.randint(lo, hi + 1, ()))]] = 1.0
    return out
'''


def _returning_body(code: str) -> str:
    """A task code block as a function body: the last expression becomes a `return`."""
    tree = ast.parse(code)
    if body_returns(tree):
        return code
    last = tree.body[-1]
    lines = code.rstrip("\n").split("\n")
    i = last.lineno - 1
    lines[i] = lines[i][: last.col_offset] + "return " + lines[i][last.col_offset:]
    return "\n".join(lines) + "\n"


def _indent(code: str, prefix: str = "    ") -> str:
    return "".join(prefix + line if line.strip() else line for line in code.rstrip("\n").splitlines(True)) + "\n"


def task_as_python(task: "Task | str | dict") -> str:
    """The task as an equivalent Python module (inputs as tensor-creating code, fns as
    `def`s, oracles as `expected_<name>` functions); `impl` is never included.

    The module runs as is (tests execute it): it creates the inputs at the
    default sizes, defines every fn for one element (folds carry an `init`
    attribute) and computes the expected outputs.
    """
    t = as_task(task)
    out_names = []
    for o in t.outputs:
        n = len(o.transforms())
        out_names += [f"expected_{o.name}()"] if n == 1 else [f"expected_{o.name}_{i}()" for i in range(n)]
    parts = [fill("python_preamble", test_name=t.test_name, input_names=", ".join(i.name for i in t.inputs),
                  output_names=", ".join(out_names)).rstrip("\n")]
    if t.global_code:
        parts.append("# global\n" + t.global_code.rstrip("\n"))
    decls = list(t.inputs) + list(t.parameters)
    if any(not isinstance(d.data_gen, str) for d in decls):
        parts.append(_MULTIHOT_HELPER.strip("\n"))
    lines = []
    for kind, items in (("input stream", t.inputs), ("parameter", t.parameters)):
        for d in items:
            shapes = _tensor_shape_code(d.dtype, d.dims)
            values = [_gen_code(d.data_gen, s) for s in shapes]
            lines.append(f"# {d.name}: {kind} of {_type_text(d.dtype)}, dims {_dims_text(d.dims)}")
            lines.append(f"{d.name} = " + (values[0] if len(values) == 1 else "[" + ", ".join(values) + "]"))
    lines.append("input_data = {" + ", ".join(f"{d.name!r}: {d.name}" for d in decls) + "}")
    parts.append("\n".join(lines))
    for f in t.fns:
        kind = f"fold with init {f.init_list()}" if f.init is not None else "map"
        text = (f"def {f.func_name}(input, state=None):\n"
                f'    """{f.name}: {_type_text(f.input_dtype)} -> {_type_text(f.output_dtype)}, one element ({kind})."""\n'
                + _indent(_returning_body(f.apply)))
        if f.init is not None:
            text += f"\n\n{f.func_name}.init = {f.init_list()!r}"
        parts.append(text.rstrip("\n"))
    for o in t.outputs:
        blocks = o.transforms()
        fields = o.dtype if isinstance(o.dtype, list) else [o.dtype]
        for i, (block, _ftype) in enumerate(zip(blocks, fields)):
            name = f"expected_{o.name}" if len(blocks) == 1 else f"expected_{o.name}_{i}"
            what = f"{o.name}" if len(blocks) == 1 else f"field {i} of {o.name}"
            parts.append(f"def {name}():\n"
                         f'    """{what}: output stream of {_type_text(o.dtype)}, dims {_dims_text(o.dims)}."""\n'
                         + _indent(_returning_body(block)).rstrip("\n"))
    return "\n\n\n".join(parts) + "\n"


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def render_task(task: "Task | str | dict", style: str = "ir") -> str:
    """The task (without impl) in a fenced block of the given style.

    Task text in the IR style is shown as given (only an `impl` key is
    removed): the driver renders it once with `render_task_ir`.
    """
    _check_style(style)
    if style == "ir":
        text = strip_impl(task) if isinstance(task, str) else task_ir(as_task(task))
        return fill("task_ir", task=text.rstrip("\n")).rstrip("\n")
    return fill("task_python", task=task_as_python(task).rstrip("\n")).rstrip("\n")


def render_example(task: "Task", style: str = "ir", title: str = "") -> str:
    """A worked example for the knowledge: the task without impl, then its impl."""
    return fill("example", title=title or task.test_name, task=render_task(task, style),
                impl=(task.impl or "").rstrip("\n")).rstrip("\n")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")


# ---------------------------------------------------------------------------
# messages


def render_demonstrations(demonstrations: Sequence[Demonstration], style: str = "ir") -> str:
    """The demonstrations block, in the given order (the driver orders them hardest first)."""
    if not demonstrations:
        return ""
    items = [
        fill("demonstration", number=i, task=render_task(d.task, style),
             impl=d.impl.strip("\n")).rstrip("\n")
        for i, d in enumerate(demonstrations, 1)
    ]
    return fill("demonstrations", items="\n\n".join(items))


def proposer_messages(
    knowledge: "Knowledge",
    demonstrations: Sequence[Demonstration],
    task: "Task",
    style: str = "ir",
    mode: str = "closed",
) -> list[dict[str, str]]:
    """Chat messages asking for the `impl` of `task` (its own impl is never shown); in mode `open`
    for its fns and impl (`open_prompts.py`: the task is shown without fns)."""
    from stepforge.loop.agents.open_prompts import open_proposer_messages, render_mixed_demonstrations

    _check_style(style)
    task_form = "written in STeP's structural IR (YAML)" if style == "ir" else "written as a Python module"
    system = fill("proposer_system", task_form=task_form, knowledge=knowledge.render(style).rstrip("\n"))
    if mode == "open":
        return open_proposer_messages(knowledge, demonstrations, as_task(task), system)
    demos = render_mixed_demonstrations(demonstrations, style)
    user = fill("proposer_user", demonstrations=demos, task=render_task(task, style))
    return [{"role": "system", "content": system.rstrip("\n") + "\n"},
            {"role": "user", "content": user.lstrip("\n").rstrip("\n") + "\n"}]


def _binding_text(binding) -> str:
    return ", ".join(f"{k}={v}" for k, v in binding.items())


def repair_messages(history: Sequence[RepairTurn]) -> list[dict[str, str]]:
    """The repair conversation after the first prompt: each earlier reply, then the verdict on it."""
    out: list[dict[str, str]] = []
    for turn in history:
        v = turn.verdict
        where = []
        if v.binding:
            where.append(f"sizes {_binding_text(v.binding)}")
        if v.seed is not None:
            where.append(f"input seed {v.seed}")
        out.append({"role": "assistant", "content": turn.reply.rstrip("\n") + "\n"})
        guarded = "" if turn.program is None or turn.program.strip() in turn.reply else \
            " (as the guardian rewrote it to obey the affine rule)"
        out.append({"role": "user", "content": fill(
            "repair_feedback", guarded=guarded, stage=v.stage, where=f" ({'; '.join(where)})" if where else "",
            message=v.message.strip() or "(no message)").rstrip("\n") + "\n"})
    return out


def guardian_messages(task: "Task", program: str, knowledge: "Knowledge | None" = None) -> list[dict[str, str]]:
    """Chat messages asking the guardian to make `program` obey the affine rule."""
    from stepforge.loop.agents.knowledge import load_knowledge

    knowledge = knowledge or load_knowledge()
    rule = " ".join(knowledge.section("The affine rule").text.split())
    system = fill("guardian_system", affine_rule=rule, examples=knowledge.render_guardian_examples().rstrip("\n"))
    user = fill("guardian_user", task=task_ir(as_task(task)).rstrip("\n"), program=program.strip("\n"))
    return [{"role": "system", "content": system.rstrip("\n") + "\n"},
            {"role": "user", "content": user.rstrip("\n") + "\n"}]


__all__ = [
    "STYLES",
    "TEMPLATES_DIR",
    "as_task",
    "fill",
    "guardian_messages",
    "load_template",
    "repair_messages",
    "proposer_messages",
    "render_demonstrations",
    "render_example",
    "render_task",
    "render_task_ir",
    "strip_impl",
    "task_as_python",
]
