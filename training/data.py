"""The SFT chat dataset: the prompt the proposer saw, and the earned program as the answer.

An example is `messages` = the proposer's chat prompt (system + user, exactly
as the loop built it) + one assistant message holding the answer the
proposer is asked for: the program in one ```python block, or for an
open-mode entry the candidate (its earned fns and impl) in one ```yaml block
(`format_answer`; the loop's reply parsers read both back unchanged). A
rebuilt prompt is posed in the entry's mode.

Sources:

- a run's buffer (RUN_DIR/buffer.jsonl): every earned entry, with the prompt
  recorded in `BufferEntry.messages`. An entry without a recorded prompt
  (e.g. from the model-free search proposer) is rebuilt with the loop's
  prompt builder from the task and the demonstrations it was earned with
  (`BufferEntry.demonstrations`, taken from the same buffer), or skipped
  (`data.missing_prompt`). `data.prompts: rebuild` rebuilds every entry's
  prompt that way (e.g. to train on the compact prompt);
- extra solved tasks (`data.extra_tasks`, keys or globs over the benchmark):
  each task's reference solution, with the round-0 prompt (no
  demonstrations) built by the loop's prompt builder.

The prompt builder (`PromptBuilder`) is the loop's own `LLMProposer`
prompt (`stepforge.loop.agents.prompts.proposer_messages`) with the knowledge and
style of the improve config (`prompt.loop_config`: its `proposer.knowledge`
and `proposer.style`) or of the SFT settings (`prompt.knowledge`,
`prompt.style`). `knowledge: none` gives the compact prompt (the system
message without the STeP reference, see `stepforge.loop.agents.knowledge`).

Entries of a run's buffer that were seeded from another run (`seed_buffer`,
marked by `source`) are not that run's experience: they make no examples
(they are still looked up as demonstrations of the entries earned with them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stepforge.errors import StepforgeError

from .settings import DataSettings, PromptSettings

ANSWER_FENCE = "```python"


@dataclass(frozen=True)
class SFTExample:
    """One chat example: the prompt messages and the assistant answer, with where it came from."""

    task_key: str
    messages: tuple[dict[str, str], ...]  # prompt messages + the assistant answer (last)
    source: str  # "buffer" or "extra"
    impl: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages[:-1]]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    def to_json(self) -> dict[str, Any]:
        return {"task_key": self.task_key, "source": self.source, "impl": self.impl,
                "messages": [dict(m) for m in self.messages], "meta": self.meta}


class DatasetError(StepforgeError, ValueError):
    """The dataset cannot be built: no buffer, a bad buffer line, an unknown task."""


OPEN_ANSWER_FENCE = "```yaml"


def format_answer(impl: str) -> str:
    """The assistant reply the proposer prompt asks for: the program in one ```python block, or an
    open-mode candidate (fns + impl YAML) in one ```yaml block."""
    from stepforge.loop.candidates import is_candidate

    body = impl.strip("\n")
    return f"{OPEN_ANSWER_FENCE if is_candidate(impl) else ANSWER_FENCE}\n{body}\n```"


def make_example(task_key: str, prompt: Sequence[dict[str, str]], impl: str, source: str,
                 meta: dict[str, Any] | None = None) -> SFTExample:
    if not prompt or prompt[-1].get("role") != "user":
        raise DatasetError(f"{task_key}: a proposer prompt must end with a user message")
    messages = tuple({"role": m["role"], "content": m["content"]} for m in prompt) + (
        {"role": "assistant", "content": format_answer(impl)},
    )
    return SFTExample(task_key=task_key, messages=messages, source=source, impl=impl, meta=dict(meta or {}))


# ---------------------------------------------------------------------------
# the loop's prompt builder


def resolve_prompt(settings: PromptSettings) -> tuple[str, str]:
    """(style, knowledge): the improve config's `proposer.style` / `proposer.knowledge` when
    `settings.loop_config` names one (its variant applied), else the inline settings."""
    if settings.loop_config:
        from stepforge.loop.config import ConfigError, load_config

        from .settings import TrainingConfigError

        try:
            cfg = load_config(settings.loop_config).effective()
        except ConfigError as exc:
            raise TrainingConfigError(str(exc)) from None
        return cfg.proposer.style, cfg.proposer.knowledge
    return settings.style, settings.knowledge


class PromptBuilder:
    """Builds proposer prompts exactly as the loop's LLM proposer does, for given prompt settings."""

    def __init__(self, settings: PromptSettings | None = None):
        settings = settings or PromptSettings()
        self.style, self.knowledge_variant = resolve_prompt(settings)
        self._knowledge = None
        self._proposer = None

    @property
    def knowledge(self):
        """What the loop's driver gives its LLMProposer: `load_knowledge(variant=proposer.knowledge)`."""
        from stepforge.loop.agents.knowledge import load_knowledge

        if self._knowledge is None:
            self._knowledge = load_knowledge(variant=self.knowledge_variant)
        return self._knowledge

    def messages(self, task: Any, demonstrations: Sequence[Any] = (), task_key: str = "task",
                 mode: str = "closed") -> list[dict[str, str]]:
        """The chat prompt the loop's LLM proposer sends for this task and these demonstrations (in `mode`)."""
        from stepforge.loop.agents.proposer import LLMProposer
        from stepforge.loop.interfaces import ProposalRequest

        if self._proposer is None:
            self._proposer = LLMProposer(None, self.knowledge, style=self.style)
        request = ProposalRequest(task_key=task_key, task=task, demonstrations=list(demonstrations), mode=mode)
        return self._proposer.messages_for(request)


def benchmark_tasks() -> dict[str, Any]:
    from stepforge.benchmark.schema import load_benchmark

    return load_benchmark()


def select_task_keys(patterns: Any, where: str = "data.extra_tasks") -> list[str]:
    """Benchmark keys that `patterns` select (keys, unique test names, globs, split names, or a selection
    mapping; benchmark/selection.py), in benchmark order."""
    from stepforge.loop.config import ConfigError, select_tasks

    try:
        return select_tasks(patterns, benchmark_tasks(), where)
    except ConfigError as exc:
        raise DatasetError(str(exc)) from None


# ---------------------------------------------------------------------------
# buffer


def load_buffer(run_dir: str | Path, seeded: bool = True) -> list[Any]:
    """The BufferEntry records of RUN_DIR/buffer.jsonl (DatasetError naming the file and line);
    `seeded=False` leaves out the entries seeded from another run (`source` set)."""
    from pydantic import ValidationError

    from stepforge.loop.interfaces import BufferEntry

    path = Path(run_dir) / "buffer.jsonl"
    if not Path(run_dir).is_dir():
        raise DatasetError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise DatasetError(f"{path}: no buffer in the run directory (has the run solved any task yet?)")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(BufferEntry.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise DatasetError(f"{path}: line {number}: not a buffer entry: {first}") from None
    return entries if seeded else [e for e in entries if not e.source]


def buffer_examples(entries: Sequence[Any], data: DataSettings, builder: PromptBuilder | None,
                    only_tasks: Sequence[str] | None = None) -> tuple[list[SFTExample], list[str]]:
    """Examples of the buffer entries within the success-rate range (and among `only_tasks` when
    given), and the entries skipped (with why)."""
    by_key = {e.task_key: e for e in entries}
    examples, skipped = [], []
    irs: dict[str, str] | None = None
    keep = set(only_tasks) if only_tasks is not None else None
    for e in entries:
        if getattr(e, "source", None):
            skipped.append(f"{e.task_key} (seeded from {e.source}, not earned in this run)")
            continue
        if keep is not None and e.task_key not in keep:
            skipped.append(f"{e.task_key} (not a training task)")
            continue
        if not (data.min_success_rate <= e.success_rate <= data.max_success_rate):
            skipped.append(f"{e.task_key} (success rate {e.success_rate:g} outside the range)")
            continue
        meta = {"success_rate": e.success_rate, "round": e.round, "step": e.step, "temperature": e.temperature,
                "demonstrations": list(e.demonstrations), "mode": getattr(e, "mode", "closed")}
        if e.messages and data.prompts == "recorded":
            examples.append(make_example(e.task_key, e.messages, e.impl, "buffer", {**meta, "prompt": "recorded"}))
            continue
        if (not e.messages and data.missing_prompt == "skip") or builder is None:
            skipped.append(f"{e.task_key} (no recorded prompt)")
            continue
        missing = [k for k in e.demonstrations if k not in by_key]
        if missing:
            skipped.append(f"{e.task_key} (demonstrations {', '.join(missing)} are not in the buffer)")
            continue
        if irs is None:
            irs = benchmark_tasks()
        if e.task_key not in irs:
            raise DatasetError(f"buffer entry {e.task_key}: not a benchmark task")
        from stepforge.loop.buffer import ExperienceBuffer

        demos = ExperienceBuffer.demonstrations([by_key[k] for k in e.demonstrations], irs)
        prompt = builder.messages(irs[e.task_key], demos, e.task_key, mode=meta["mode"])
        examples.append(make_example(e.task_key, prompt, e.impl, "buffer", {**meta, "prompt": "rebuilt"}))
    return examples, skipped


def extra_examples(keys: Sequence[str], builder: PromptBuilder) -> list[SFTExample]:
    """Reference solutions of benchmark tasks, with the round-0 prompt the loop would build."""
    tasks = benchmark_tasks()
    irs = {k: tasks[k] for k in keys}
    out = []
    for key in keys:
        impl = tasks[key].impl
        if not impl:
            raise DatasetError(f"extra task {key}: has no reference impl")
        out.append(make_example(key, builder.messages(irs[key], [], key), impl, "extra", {"prompt": "round0"}))
    return out


@dataclass
class BuiltDataset:
    examples: list[SFTExample]
    skipped: list[str]
    buffer_entries: int
    extra_tasks: list[str]

    def summary(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "buffer_entries": self.buffer_entries,
                "from_buffer": sum(1 for e in self.examples if e.source == "buffer"),
                "from_extra": sum(1 for e in self.examples if e.source == "extra"),
                "extra_tasks": self.extra_tasks, "skipped": self.skipped}


def build_dataset(run_dir: str | Path | None, data: DataSettings, prompt: PromptSettings,
                  extra_tasks: Sequence[str] = (), only_tasks: Sequence[str] | None = None) -> BuiltDataset:
    """Examples from a run's buffer (optional; restricted to `only_tasks` when given) plus extra
    tasks' reference solutions, each repeated `data.repeat` times."""
    builder = PromptBuilder(prompt)
    entries = load_buffer(run_dir) if run_dir is not None else []
    examples, skipped = buffer_examples(entries, data, builder, only_tasks)
    patterns = list(data.extra_tasks) + list(extra_tasks)
    keys = select_task_keys(patterns) if patterns else []
    if data.extra_tasks_exclude_buffer:
        have = {e.task_key for e in examples}
        keys = [k for k in keys if k not in have]
    examples += extra_examples(keys, builder)
    examples = [ex for ex in examples for _ in range(data.repeat)]
    return BuiltDataset(examples, skipped, len(entries), keys)


def write_dataset(path: str | Path, examples: Sequence[SFTExample]) -> None:
    """The examples as JSON lines (`messages`, `task_key`, `source`, `impl`, `meta`)."""
    Path(path).write_text("".join(json.dumps(ex.to_json()) + "\n" for ex in examples), encoding="utf-8")


def read_dataset(path: str | Path) -> list[SFTExample]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(SFTExample(d["task_key"], tuple(d["messages"]), d["source"], d["impl"], d.get("meta", {})))
    return out


__all__ = [
    "BuiltDataset",
    "DatasetError",
    "PromptBuilder",
    "SFTExample",
    "build_dataset",
    "buffer_examples",
    "extra_examples",
    "format_answer",
    "load_buffer",
    "make_example",
    "read_dataset",
    "resolve_prompt",
    "select_task_keys",
    "write_dataset",
]
