"""Base knowledge: the STeP documentation every proposer prompt starts with.

The knowledge lives in data files under `loop/agents/knowledge/`:

- `language.yaml`: the rules of streams, task files, fns, the affine rule and
  the program language (docs/language.md and docs/task-format.md), as prose sections;
- `operators.yaml`: the 14 operators of docs/language.md section 4, each with its
  call form, typing rule, semantics and the names of its worked examples;
- `kb_*.yaml`: the worked examples, real task files (the benchmark schema, with
  `impl` and `bindings`) so that the tests verify every one of them and the
  prompt can never teach something false;
- `guardian_examples.yaml`: programs before and after the affine repair, for
  the guardian prompt (each names a `kb_*` task; both versions are tested).

`load_knowledge()` reads and cross-checks the files (every operator documented
once, every example exists and uses the operator that lists it, every impl
parses) and raises `KnowledgeError` naming the file and key on any problem.
`Knowledge.render()` is the text that prefixes every proposer prompt; it is
deterministic, so all prompts of a round share it as a prefix.

Variants (`proposer.knowledge` of an improve config, `load_knowledge(variant=...)`):

- `full` (default): the base knowledge above, the published setting;
- `none`: `CompactKnowledge`, no STeP reference at all: the proposer's system
  message keeps only the role and the answer format (a few hundred tokens
  instead of many thousands). For a fine-tuned model, which carries the
  language in its weights, and for SFT on CPU, where short prompts train in
  seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from stepforge.config_io import read_text_file, read_yaml_file
from stepforge.errors import ConfigError, StepforgeError, short_repr

KNOWLEDGE_DIR = Path(__file__).resolve().parent
EXAMPLE_PREFIX = "kb_"


class KnowledgeError(StepforgeError, ValueError):
    """A knowledge file that is missing, malformed or inconsistent; names the file and key."""

    def __init__(self, path: str | Path, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class OperatorDoc:
    op: str
    call: str
    typing: str
    semantics: str
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Section:
    title: str
    text: str
    place: str  # "before" or "after" the operators


@dataclass(frozen=True)
class KnowledgeExample:
    """A worked example: a task file with its reference `impl`."""

    name: str
    path: Path
    text: str  # the file text (task YAML with impl and bindings)
    task: Any  # stepforge.benchmark.schema.Task

    @property
    def impl(self) -> str:
        return self.task.impl

    @property
    def description(self) -> str:
        return " ".join((self.task.description or "").split())


@dataclass(frozen=True)
class GuardianExample:
    task: str
    note: str
    before: str
    after: str


@dataclass(frozen=True)
class Knowledge:
    sections: tuple[Section, ...]
    operators: tuple[OperatorDoc, ...]
    example_map: Mapping[str, KnowledgeExample]  # read-only: the loaded knowledge is shared (cached)
    guardian_examples: tuple[GuardianExample, ...]
    root: Path = KNOWLEDGE_DIR
    _rendered: dict = field(default_factory=dict, compare=False, repr=False)

    def examples(self) -> list[tuple[str, str]]:
        """`(name, task YAML with impl)` for every worked example, in the order the prompt shows them."""
        return [(name, self.example_map[name].text) for name in self.example_order()]

    def example_order(self) -> list[str]:
        """Example names in render order: each under the first operator that lists it."""
        seen: list[str] = []
        for doc in self.operators:
            for name in doc.examples:
                if name not in seen:
                    seen.append(name)
        seen.extend(sorted(n for n in self.example_map if n not in seen))
        return seen

    def section(self, title: str) -> Section:
        for s in self.sections:
            if s.title == title:
                return s
        raise KeyError(title)

    def render(self, style: str = "ir") -> str:
        """The knowledge text for the prompt; examples as structural IR (`ir`) or as Python (`python`)."""
        if style not in ("ir", "python"):
            raise ValueError(f"unknown style {style!r}; expected 'ir' or 'python'")
        if style not in self._rendered:
            self._rendered[style] = self._render(style)
        return self._rendered[style]

    def _render(self, style: str) -> str:
        from stepforge.loop.agents.prompts import render_example
        out = ["# STeP reference", ""]
        for s in self.sections:
            if s.place == "before":
                out += [f"## {s.title}", s.text.rstrip(), ""]
        out += ["## Operators", "", "Notation: x has dims s = [d0, ..., dr] (innermost first), rank r, element type T.", ""]
        shown: set[str] = set()
        for doc in self.operators:
            out.append(f"### {doc.op}")
            out.append(f"Call: {doc.call}")
            out.append(f"Typing: {doc.typing}")
            out.append(f"Semantics: {doc.semantics}")
            later = [n for n in doc.examples if n in shown]
            if later:
                out.append("See also example " + ", ".join(later) + " above.")
            out.append("")
            for name in doc.examples:
                if name in shown:
                    continue
                shown.add(name)
                ex = self.example_map[name]
                out.append(render_example(ex.task, style=style, title=f"Example {name}: {ex.description}"))
                out.append("")
        for s in self.sections:
            if s.place == "after":
                out += [f"## {s.title}", s.text.rstrip(), ""]
        return "\n".join(out).rstrip() + "\n"

    def render_guardian_examples(self) -> str:
        """The worked affine repairs for the guardian prompt."""
        parts = []
        for i, ex in enumerate(self.guardian_examples, 1):
            parts.append(
                f"Example {i} (task {ex.task}): {' '.join(ex.note.split())}\n"
                f"Before:\n```python\n{ex.before.rstrip()}\n```\n"
                f"After:\n```python\n{ex.after.rstrip()}\n```"
            )
        return "\n\n".join(parts) + "\n"


def _read_yaml(path: Path) -> Any:
    try:
        return read_yaml_file(path, "knowledge file")
    except ConfigError as exc:
        raise KnowledgeError(path, "", str(exc).removeprefix(f"{path}: ")) from None


def _text(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeError(path, key, f"expected non-empty text, got {short_repr(value)}")
    return value


def _load_sections(path: Path) -> tuple[Section, ...]:
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("sections"), list) or not data["sections"]:
        raise KnowledgeError(path, "sections", "expected a non-empty list of {title, place, text}")
    out = []
    for i, item in enumerate(data["sections"]):
        if not isinstance(item, dict) or set(item) != {"title", "place", "text"}:
            raise KnowledgeError(path, f"sections[{i}]", f"expected keys title, place and text, got {short_repr(item)}")
        if item["place"] not in ("before", "after"):
            raise KnowledgeError(path, f"sections[{i}].place", f"expected before or after, got {short_repr(item['place'])}")
        out.append(Section(_text(path, f"sections[{i}].title", item["title"]).strip(),
                           _text(path, f"sections[{i}].text", item["text"]), item["place"]))
    titles = [s.title for s in out]
    for needed in ("The affine rule", "What a program may contain"):
        if needed not in titles:
            raise KnowledgeError(path, "sections", f"missing the section {needed!r}")
    return tuple(out)


def _load_operators(path: Path) -> tuple[OperatorDoc, ...]:
    from stepforge.simulator.program import OPS

    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("operators"), list):
        raise KnowledgeError(path, "operators", "expected a list of operator entries")
    docs = []
    keys = {"op", "call", "typing", "semantics", "examples"}
    for i, item in enumerate(data["operators"]):
        where = f"operators[{i}]"
        if not isinstance(item, dict) or set(item) != keys:
            got = sorted(item) if isinstance(item, dict) else repr(item)
            raise KnowledgeError(path, where, f"expected keys {', '.join(sorted(keys))}, got {got}")
        if item["op"] not in OPS:
            raise KnowledgeError(path, f"{where}.op", f"unknown operator {short_repr(item['op'])}; expected one of {', '.join(OPS)}")
        examples = item["examples"]
        if not isinstance(examples, list) or not examples or not all(isinstance(e, str) for e in examples):
            raise KnowledgeError(path, f"{where}.examples", "expected a non-empty list of example names")
        docs.append(OperatorDoc(item["op"], _text(path, f"{where}.call", item["call"]).strip(),
                                " ".join(_text(path, f"{where}.typing", item["typing"]).split()),
                                " ".join(_text(path, f"{where}.semantics", item["semantics"]).split()),
                                tuple(examples)))
    names = [d.op for d in docs]
    missing = [op for op in OPS if op not in names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or repeated:
        raise KnowledgeError(path, "operators", f"every operator once: missing {missing}, repeated {repeated}")
    return tuple(docs)


def _load_examples(root: Path) -> dict[str, KnowledgeExample]:
    from stepforge.benchmark.schema import Task, TaskFileError
    from stepforge.simulator import ProgramSyntaxError, parse_program

    out = {}
    for path in sorted(root.glob(f"{EXAMPLE_PREFIX}*.yaml")):
        try:
            text = read_text_file(path, "worked example")
        except ConfigError as exc:
            raise KnowledgeError(path, "", str(exc).removeprefix(f"{path}: ")) from None
        try:
            task = Task.from_yaml(text, source=path)
        except TaskFileError as exc:
            raise KnowledgeError(path, exc.key, exc.expected) from None
        if task.test_name != path.stem:
            raise KnowledgeError(path, "test_name", f"expected {path.stem!r} (the file name), got {short_repr(task.test_name)}")
        if not task.impl:
            raise KnowledgeError(path, "impl", "a worked example needs its impl")
        if not task.description:
            raise KnowledgeError(path, "description", "a worked example needs a one-line description")
        try:
            parse_program(task.impl)
        except ProgramSyntaxError as exc:
            raise KnowledgeError(path, "impl", exc.message) from None
        out[task.test_name] = KnowledgeExample(task.test_name, path, text, task)
    if not out:
        raise KnowledgeError(root, "", f"no worked examples ({EXAMPLE_PREFIX}*.yaml)")
    return out


def _load_guardian(path: Path, examples: dict[str, KnowledgeExample]) -> tuple[GuardianExample, ...]:
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise KnowledgeError(path, "examples", "expected a non-empty list of {task, note, before, after}")
    out = []
    for i, item in enumerate(data["examples"]):
        where = f"examples[{i}]"
        if not isinstance(item, dict) or set(item) != {"task", "note", "before", "after"}:
            raise KnowledgeError(path, where, "expected keys task, note, before, after")
        if item["task"] not in examples:
            raise KnowledgeError(path, f"{where}.task", f"no worked example {short_repr(item['task'])}")
        out.append(GuardianExample(item["task"], _text(path, f"{where}.note", item["note"]),
                                   _text(path, f"{where}.before", item["before"]),
                                   _text(path, f"{where}.after", item["after"])))
    return tuple(out)


def _uses_op(impl: str, op: str) -> bool:
    from stepforge.simulator.program import Apply, Comprehension, parse_program

    return any(isinstance(st, (Apply, Comprehension)) and st.call.op == op for st in parse_program(impl).statements)


@functools.lru_cache(maxsize=8)
def _load(root: str) -> Knowledge:
    path = Path(root)
    sections = _load_sections(path / "language.yaml")
    operators = _load_operators(path / "operators.yaml")
    examples = _load_examples(path)
    for i, doc in enumerate(operators):
        for name in doc.examples:
            if name not in examples:
                raise KnowledgeError(path / "operators.yaml", f"operators[{i}].examples",
                                     f"no worked example {name!r} ({EXAMPLE_PREFIX}{name.removeprefix(EXAMPLE_PREFIX)}.yaml)")
            if not _uses_op(examples[name].impl, doc.op):
                raise KnowledgeError(path / "operators.yaml", f"operators[{i}].examples",
                                     f"example {name} does not use {doc.op}")
    guardian = _load_guardian(path / "guardian_examples.yaml", examples)
    return Knowledge(sections, operators, MappingProxyType(examples), guardian, path)


KNOWLEDGE_VARIANTS = ("full", "none")


@dataclass(frozen=True)
class CompactKnowledge:
    """The `none` knowledge: stands in for `Knowledge` in the proposer prompt with no reference text.

    Only `render` is offered: the guardian prompt needs the affine rule and its
    worked repairs, so an LLM guardian always uses the full knowledge.
    """

    variant: str = "none"

    def render(self, style: str = "ir") -> str:
        if style not in ("ir", "python"):
            raise ValueError(f"unknown style {style!r}; expected 'ir' or 'python'")
        return ""


def load_knowledge(root: str | Path | None = None, *, variant: str = "full") -> "Knowledge | CompactKnowledge":
    """The proposer's knowledge: `full` = the base knowledge from `root` (default: the package's
    `loop/agents/knowledge/`; cached), `none` = `CompactKnowledge` (no STeP reference)."""
    if variant not in KNOWLEDGE_VARIANTS:
        raise ValueError(f"unknown knowledge {variant!r}; expected one of {', '.join(KNOWLEDGE_VARIANTS)}")
    if variant == "none":
        return CompactKnowledge()
    return _load(str(Path(root).resolve() if root is not None else KNOWLEDGE_DIR))


__all__ = [
    "CompactKnowledge",
    "GuardianExample",
    "KNOWLEDGE_DIR",
    "KNOWLEDGE_VARIANTS",
    "Knowledge",
    "KnowledgeError",
    "KnowledgeExample",
    "OperatorDoc",
    "Section",
    "load_knowledge",
]
