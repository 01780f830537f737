"""Prompts of open mode (docs/language.md, section 5a): the task without its fns, the fn language, open examples.

An open proposer prompt keeps the closed prompt's shape and prefix, so that
prefix caching serves both modes::

    system: role + base knowledge                    the closed system message, unchanged
            + fn language, vocabulary, open examples  same for every open prompt
    user:   demonstrations (each in its own mode),    same within a round
            the open instruction,                     same for every open prompt
            the target task without fns               differs

The open text lives in `knowledge/open_mode.yaml` and `templates/open_*.txt`.
Worked examples and open demonstrations show the task without fns, then the
answer as a candidate (fns + impl YAML): their fns are part of the answer,
never given.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import yaml

from stepforge.loop.agents.knowledge import KNOWLEDGE_DIR, KnowledgeError
from stepforge.loop.agents.prompts import fill
from stepforge.loop.agents.prompts import render_demonstrations as _closed_demonstrations
from stepforge.loop.interfaces import Demonstration

if TYPE_CHECKING:  # pragma: no cover
    from stepforge.benchmark.schema import Task
    from stepforge.loop.agents.knowledge import Knowledge

OPEN_KNOWLEDGE = KNOWLEDGE_DIR / "open_mode.yaml"
_TEXT_KEYS = ("title", "text", "language", "vocabulary_intro")

_OPEN_IR: dict[int, tuple["Task", str]] = {}


@functools.lru_cache(maxsize=None)
def open_knowledge() -> dict:
    """`knowledge/open_mode.yaml`, checked (KnowledgeError naming the key)."""
    data = yaml.safe_load(OPEN_KNOWLEDGE.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise KnowledgeError(OPEN_KNOWLEDGE, "", "expected a mapping")
    for key in _TEXT_KEYS:
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise KnowledgeError(OPEN_KNOWLEDGE, key, "expected text")
    if not isinstance(data.get("examples"), list) or not data["examples"]:
        raise KnowledgeError(OPEN_KNOWLEDGE, "examples", "expected a list of kb_* example names")
    if not isinstance(data.get("vocabulary"), dict):
        raise KnowledgeError(OPEN_KNOWLEDGE, "vocabulary", "expected a mapping of kind -> names")
    return data


def render_open_task(task: "Task") -> str:
    """The task as an open prompt shows it: the IR without impl, metadata and fns (its vocabulary kept)."""
    hit = _OPEN_IR.get(id(task))
    if hit is not None and hit[0] is task:
        return hit[1]
    from stepforge.benchmark.task_model import _Dumper, _Flow, _FlowList

    data = task.to_dict(include_impl=False, include_meta=False)
    data.pop("fns", None)
    if task.vocabulary is not None:
        data["vocabulary"] = _Flow({k: _FlowList(v) for k, v in task.vocabulary.model_dump().items() if v})
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100,
                     default_flow_style=False)
    text = fill("task_ir", task=text.rstrip("\n")).rstrip("\n")
    if len(_OPEN_IR) >= 4096:
        _OPEN_IR.clear()
    _OPEN_IR[id(task)] = (task, text)
    return text


def render_answer(candidate_text: str) -> str:
    """An open answer block: the candidate YAML in a ```yaml fence."""
    return fill("open_answer", candidate=candidate_text.strip("\n")).rstrip("\n")


def reference_answer(task: "Task") -> str:
    """The task's own fns and impl as an open answer (the form of the worked examples)."""
    from stepforge.benchmark.open_mode import reference_candidate

    return render_answer(reference_candidate(task).to_yaml())


def _open_system_part(knowledge: "Knowledge") -> str:
    cached = knowledge._rendered.get("open")
    if cached is not None:
        return cached
    data = open_knowledge()
    vocabulary = "".join(f"  {kind}: {names}\n" for kind, names in data["vocabulary"].items())
    examples = []
    for name in data["examples"]:
        if name not in knowledge.example_map:
            raise KnowledgeError(OPEN_KNOWLEDGE, "examples", f"{name!r} is not a worked example (kb_*.yaml)")
        ex = knowledge.example_map[name]
        examples.append(fill("open_example", title=f"Example {name} (open): {ex.description}",
                             task=render_open_task(ex.task), answer=reference_answer(ex.task)).rstrip("\n"))
    text = fill("open_system", title=data["title"].strip(), text=data["text"].rstrip("\n"),
                language=data["language"].rstrip("\n"), vocabulary_intro=data["vocabulary_intro"],
                vocabulary=vocabulary.rstrip("\n"), examples="\n\n".join(examples)).rstrip("\n")
    knowledge._rendered["open"] = text
    return text


def open_system_part(knowledge: "Knowledge") -> str:
    """What an open prompt's system message adds after the closed one (empty for knowledge `none`)."""
    if not getattr(knowledge, "example_map", None):
        data = open_knowledge()
        return "\n\n" + data["text"].rstrip("\n") + "\n" + data["language"].rstrip("\n")
    return _open_system_part(knowledge)


def render_mixed_demonstrations(demonstrations: Sequence[Demonstration], style: str = "ir") -> str:
    """The demonstrations block; an open demonstration shows its task without fns and its earned candidate."""
    if not any(d.mode == "open" for d in demonstrations):
        return _closed_demonstrations(demonstrations, style)
    items = []
    for i, d in enumerate(demonstrations, 1):
        if d.mode == "open":
            items.append(fill("open_demonstration", number=i, task=render_open_task(d.task),
                              answer=render_answer(d.impl)).rstrip("\n"))
        else:
            one = _closed_demonstrations([d], style)
            items.append(one.split("\n\n", 1)[1].replace("### Solved task 1", f"### Solved task {i}", 1))
    return fill("demonstrations", items="\n\n".join(items))


def open_proposer_messages(knowledge: "Knowledge", demonstrations: Sequence[Demonstration],
                           task: "Task", closed_system: str) -> list[dict[str, str]]:
    """Chat messages asking for the fns and impl of `task` (its own fns and impl are never shown).

    `closed_system` is the closed prompt's system message: the open one extends it.
    """
    system = closed_system.rstrip("\n") + "\n" + open_system_part(knowledge).rstrip("\n") + "\n"
    user = fill("open_user", demonstrations=render_mixed_demonstrations(demonstrations), task=render_open_task(task))
    return [{"role": "system", "content": system},
            {"role": "user", "content": user.lstrip("\n").rstrip("\n") + "\n"}]


__all__ = ["OPEN_KNOWLEDGE", "open_knowledge", "open_proposer_messages", "open_system_part", "reference_answer",
           "render_answer", "render_mixed_demonstrations", "render_open_task"]
