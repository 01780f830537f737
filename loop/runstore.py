"""The run directory of `stepforge improve`, and what makes `--resume` safe.

Files (all UTF-8):

=================  ==========================================================
config.yaml        the experiment config as run (written once, atomically)
samples.jsonl      one line per sample (SampleRecord), appended as samples
                   are verified
prompts.jsonl      one line per distinct proposer prompt: {prompt_id, messages}
                   (samples refer to it by id; n samples share one prompt)
steps.jsonl        one line per finished step of Algorithm 1 (StepRecord)
buffer.jsonl       the experience buffer: one BufferEntry per solved task
                   (rewritten atomically whenever it grows; empty at first,
                   or the seeded entries, marked by `source`)
seed_buffer.jsonl  with `seed_buffer`: the seeded entries as the run started
                   (a resumed run replays these, whatever the source holds now)
state.json         where the run is: round, step, unsolved tasks, seeds,
                   status (rewritten atomically: temp file + os.replace)
summary.json       metrics of the run (written at the end)
report.md, *.png   written by `stepforge report` (and at the end of improve)
.lock              locked (fcntl.flock) while a process runs in the directory
=================  ==========================================================

Appending. A batch of records becomes one `os.write` of complete lines on
an O_APPEND descriptor, then fsync. A kill can only leave the last line
torn; `load_jsonl` drops such a line (and truncates it away before the
file is appended to again). A bad line anywhere else is corruption and is
reported with the file and line number.

Resume. A sample's key is (round, step, task, temperature, index) and its
proposer seed derives from the config seed and the key, so the driver
replays the run from the start and skips every sample already on disk;
the replay reaches exactly the state the killed run was in, and the run
continues from there. Nothing verified is lost and nothing is redone.
A repair turn t > 0 of a sample is keyed by the sample's key plus `/k<t>`
(`turn`, with `parent` = the key of the turn it answers).

One process at a time: the directory is locked (fcntl) while a run holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from pydantic import BaseModel, Field, ValidationError

from stepforge.benchmark.verdict import Verdict
from stepforge.errors import StepforgeError, short_text
from stepforge.loop.interfaces import BufferEntry

CONFIG = "config.yaml"
SAMPLES = "samples.jsonl"
PROMPTS = "prompts.jsonl"
STEPS = "steps.jsonl"
BUFFER = "buffer.jsonl"
SEED_BUFFER = "seed_buffer.jsonl"
STATE = "state.json"
SUMMARY = "summary.json"
REPORT = "report.md"
LOCK = ".lock"


class RunStoreError(StepforgeError):
    """A run directory that cannot be created, resumed or read."""


# ---------------------------------------------------------------------------
# records


def sample_key(round_: int, step: int, task: str, temperature: float, index: int, turn: int = 0) -> str:
    """The deterministic key of one sample (a repair turn > 0 adds `/k<turn>` to its first turn's key)."""
    key = f"r{round_}/s{step}/{task}/t{temperature:g}/i{index}"
    return f"{key}/k{turn}" if turn else key


def request_id(rec: Any) -> tuple:
    """The request a sample record came from: (round, step, task, temperature), plus (turn, index) for a
    repair turn (each follow-up is its own request). Works on SampleRecords and on their dicts."""
    get = rec.get if isinstance(rec, dict) else (lambda k, d=None: getattr(rec, k, d))
    base = (get("round"), get("step"), get("task"), get("temperature"))
    turn = get("turn", 0) or 0
    return base + ((turn, get("index")),) if turn else base


class SampleRecord(BaseModel):
    """One line of samples.jsonl: a candidate program and everything known about it."""

    round: int
    step: int
    task: str
    temperature: float
    index: int
    of: int  # how many proposals the request returned (index < of)
    seed: int
    demonstrations: list[str] = Field(default_factory=list)
    dropped_demonstrations: list[str] = Field(default_factory=list)  # not in the prompt: it would not fit the context
    prompt_id: Optional[str] = None
    raw: str
    mode: str = "closed"  # open: program/guarded are candidates (fns + impl YAML)
    program: Optional[str] = None  # extracted from the reply (None: nothing parsable found, stage `parse`)
    guarded: Optional[str] = None  # after the guardian (what was verified)
    guard_changed: bool = False
    verdict: Verdict
    correct: bool = False
    verified: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guard_prompt_tokens: int = 0
    guard_completion_tokens: int = 0
    timings: dict[str, float] = Field(default_factory=dict)  # generate_s, guard_s, verify_s
    cost: dict[str, float] = Field(default_factory=dict)  # Proposal.cost (the search's expansions, candidates)
    time: float = 0.0  # unix time the sample was recorded
    turn: int = 0  # repair turn: 0 = the first answer, t > 0 = the t-th answer after verifier feedback
    parent: Optional[str] = None  # the key of the turn this one answers (None for turn 0)

    @property
    def key(self) -> str:
        return sample_key(self.round, self.step, self.task, self.temperature, self.index, self.turn)


class StepRecord(BaseModel):
    """One line of steps.jsonl: a finished step of Algorithm 1."""

    round: int
    step: int
    demonstrations: list[str]
    tasks: list[str]
    solved: list[str]
    samples: int
    correct: int
    seconds: float
    started: float
    finished: float


# ---------------------------------------------------------------------------
# low-level file helpers


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_lines(path: Path, lines: Iterable[str]) -> int:
    """Append complete lines with one write + fsync; returns the bytes written."""
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    if not data:
        return 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def load_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Every line of a JSONL file as a dict.

    The last line is a torn write from a kill when it lacks its newline or is
    not a JSON object: it is dropped (and with `repair`, cut off the file, so
    that the next append starts on a fresh line). A bad line anywhere else
    raises RunStoreError naming the file and the line.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    # after the final newline split() leaves b"" (complete file) or the torn tail
    tail = lines.pop()
    out: list[dict] = []
    offset = 0
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                value = json.loads(line.decode("utf-8"))
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                if number == len(lines) and not tail.strip():
                    tail = line  # the last line: torn, treat like a missing newline
                    break
                why = "nested too deep" if isinstance(exc, RecursionError) else short_text(exc, 80)
                raise RunStoreError(f"{path}: line {number}: not a JSON record ({why}); "
                                    f"the run directory is corrupt") from None
            out.append(value)
        offset += len(line) + 1
    if tail.strip() and repair:
        with open(path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
    return out


def validated_records(path: Path, model: type[BaseModel], what: str, repair: bool = False) -> list[Any]:
    """Every line of a JSONL file as a `model`; RunStoreError naming the file, the line and the first problem."""
    from stepforge.config_io import validation_problems

    out = []
    for number, data in enumerate(load_jsonl(path, repair=repair), start=1):
        try:
            out.append(model.model_validate(data))
        except ValidationError as exc:
            key, problem = validation_problems(exc, model)[0]
            raise RunStoreError(f"{path}: record {number}: {key or '(top level)'}: {problem} "
                                f"(expected {what}); the run directory is corrupt") from None
    return out


class PromptRecord(BaseModel):
    """One line of prompts.jsonl: a proposer prompt and its id."""

    prompt_id: str
    messages: list[dict[str, str]]


# ---------------------------------------------------------------------------
# the run directory


class RunStore:
    """A run directory: create it for a new run, or open it to resume or report."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_fd: Optional[int] = None
        self._prompt_ids: set[str] = set()
        self._step_ids: set[tuple[int, int]] = set()

    # -- paths ------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    # -- lifecycle --------------------------------------------------------
    @staticmethod
    def check_new(root: str | Path) -> None:
        """RunStoreError unless `root` can hold a new run (missing, or an empty folder)."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            hint = f"use --resume {root} to continue it, or " if (root / CONFIG).is_file() else ""
            raise RunStoreError(f"{root}: run directory exists and is not empty; {hint}choose another --run-dir")

    @classmethod
    def create(cls, root: str | Path, config_yaml: str) -> "RunStore":
        """A fresh run directory (it may exist only if empty)."""
        root = Path(root)
        cls.check_new(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"{root}: cannot create the run directory: {exc.strerror or exc}") from None
        store = cls(root)
        store.lock()
        atomic_write_text(store.path(CONFIG), config_yaml)
        return store

    @classmethod
    def open(cls, root: str | Path, lock: bool = True) -> "RunStore":
        """An existing run directory (to resume: `lock=True`; to report: False)."""
        root = Path(root)
        if not root.is_dir():
            raise RunStoreError(f"{root}: no such run directory")
        if not (root / CONFIG).is_file():
            raise RunStoreError(f"{root}: not a run directory (no {CONFIG})")
        store = cls(root)
        if lock:
            store.lock()
        return store

    def lock(self) -> None:
        """Hold the directory's lock (released when the process exits, even by SIGKILL)."""
        fd = os.open(self.path(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunStoreError(f"{self.root}: another stepforge process is using this run directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- config -----------------------------------------------------------
    def config_text(self) -> str:
        from stepforge.config_io import read_text_file

        return read_text_file(self.path(CONFIG), "run config")

    def config_data(self) -> dict[str, Any]:
        """config.yaml as a mapping, read by the bounded reader (`config_io.read_mapping`)."""
        from stepforge.config_io import read_mapping

        return read_mapping(self.path(CONFIG), "settings (tasks, proposer, ...)", noun="run config")

    # -- samples ----------------------------------------------------------
    def load_samples(self, repair: bool = False) -> dict[str, SampleRecord]:
        """The recorded samples by key (a torn last line dropped)."""
        out: dict[str, SampleRecord] = {}
        for rec in validated_records(self.path(SAMPLES), SampleRecord, "a sample record", repair):
            out.setdefault(rec.key, rec)
        return out

    def sample_dicts(self) -> list[dict]:
        """samples.jsonl as plain dicts (for metrics and reports)."""
        return load_jsonl(self.path(SAMPLES))

    def append_samples(self, records: list[SampleRecord]) -> None:
        """Append one batch of samples atomically."""
        if records:
            append_lines(self.path(SAMPLES), (r.model_dump_json() for r in records))

    # -- prompts ----------------------------------------------------------
    def load_prompts(self, repair: bool = False) -> dict[str, list[dict[str, str]]]:
        out = {}
        for rec in validated_records(self.path(PROMPTS), PromptRecord, "a prompt record {prompt_id, messages}", repair):
            out[rec.prompt_id] = rec.messages
        self._prompt_ids = set(out)
        return out

    def add_prompts(self, prompts: dict[str, list[dict[str, str]]]) -> None:
        """Record prompts not yet on disk (one write)."""
        new = {k: v for k, v in prompts.items() if k not in self._prompt_ids}
        if new:
            append_lines(self.path(PROMPTS), (json.dumps({"prompt_id": k, "messages": v}) for k, v in new.items()))
            self._prompt_ids.update(new)

    # -- steps ------------------------------------------------------------
    def load_steps(self, repair: bool = False) -> list[StepRecord]:
        out = validated_records(self.path(STEPS), StepRecord, "a step record", repair)
        self._step_ids = {(s.round, s.step) for s in out}
        return out

    def append_step(self, step: StepRecord) -> bool:
        """Record a finished step unless it already is (a replayed step keeps its first record)."""
        if (step.round, step.step) in self._step_ids:
            return False
        append_lines(self.path(STEPS), [step.model_dump_json()])
        self._step_ids.add((step.round, step.step))
        return True

    # -- buffer, state, summary -------------------------------------------
    def write_buffer(self, entries: list[BufferEntry]) -> None:
        atomic_write_text(self.path(BUFFER), "".join(e.model_dump_json() + "\n" for e in entries))

    def load_buffer(self) -> list[BufferEntry]:
        return validated_records(self.path(BUFFER), BufferEntry, "a buffer entry")

    def write_state(self, state: dict[str, Any]) -> None:
        state = {**state, "updated": time.time()}
        atomic_write_text(self.path(STATE), json.dumps(state, indent=2, sort_keys=False) + "\n")

    def load_state(self) -> dict[str, Any]:
        return self._load_json(STATE)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path(SUMMARY), json.dumps(summary, indent=2, sort_keys=False) + "\n")

    def load_summary(self) -> dict[str, Any]:
        return self._load_json(SUMMARY)

    def _load_json(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        if not path.exists():
            return {}
        try:
            value = json.loads(path.read_bytes().decode("utf-8"))
        except RecursionError:
            raise RunStoreError(f"{path}: not valid JSON: nested too deep") from None
        except ValueError as exc:  # UnicodeDecodeError too
            raise RunStoreError(f"{path}: not valid JSON: {short_text(exc, 80)}") from None
        if not isinstance(value, dict):
            raise RunStoreError(f"{path}: (top level): expected a JSON object, got {type(value).__name__}; "
                                f"the run directory is corrupt")
        return value

    def prepare_resume(self) -> tuple[dict[str, SampleRecord], list[StepRecord]]:
        """Cut torn last lines off every log and load what was recorded."""
        samples = self.load_samples(repair=True)
        self.load_prompts(repair=True)
        steps = self.load_steps(repair=True)
        return samples, steps

    def iter_samples(self) -> Iterator[dict]:
        yield from self.sample_dicts()


__all__ = [
    "BUFFER",
    "CONFIG",
    "PROMPTS",
    "REPORT",
    "RunStore",
    "RunStoreError",
    "SAMPLES",
    "SEED_BUFFER",
    "STATE",
    "STEPS",
    "SUMMARY",
    "SampleRecord",
    "StepRecord",
    "append_lines",
    "atomic_write_text",
    "load_jsonl",
    "request_id",
    "sample_key",
    "validated_records",
]
