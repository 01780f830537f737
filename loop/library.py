"""`stepforge library RUN_DIR... --out DIR`: the programs runs earned, as an operator library.

A run's buffer.jsonl holds one earned program per solved task; its
config.yaml says how it was earned (`mode: closed|open`, default closed; the
proposer and model). The library is what a person takes away:

================================  ===============================================
DIR/<group>/<test_name>.yaml      one operator (closed mode): the task file with
                                  the earned `impl` in place of the reference; so
                                  DIR is itself a benchmark folder (`--root DIR`)
DIR/open/<group>/<test_name>.yaml an operator earned in open mode: the task file
                                  with the earned `fns` and `impl`
DIR/tests/test_<group>__<id>.py   a standalone pytest file per operator
                                  (benchmark/export.py)
DIR/index.md                      operator, group, mode, lines, Copies, how it was
                                  earned (run, round, demonstrations, proposer,
                                  model), and the entries not written
DIR/provenance.json               per operator: bindings, seeds, tolerance, the
                                  verdict, the stepforge version; the runs read
================================  ===============================================

Every entry is verified again (the verifier pool, a time limit per program,
the run's seeds) before anything is written; one that no longer verifies (a
changed task, an edited buffer) is listed in the index and provenance, not
written. Seeded entries (`source` set: another run's experience) are skipped:
give that run itself. With several runs, each operator (task and mode) keeps
its shortest verified program (fewest statements, then characters; the first
run given wins ties); the others are listed as superseded.

An open entry carries `fns` (task-file fn entries written by the model)
besides `impl`; it is verified as an open candidate (the fn-language
interpreter, never exec) where this stepforge has open mode (the module
`stepforge.benchmark.open_mode`), else listed as not verifiable. Its YAML
holds the earned fns as the task's fns, so `stepforge verify FILE` and its
pytest file check them as task fns; they are written only after they passed
the fn language.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from stepforge.errors import StepforgeError

INDEX = "index.md"
PROVENANCE = "provenance.json"
TESTS = "tests"
OPEN_DIR = "open"


class LibraryError(StepforgeError):
    """A run directory that cannot be read, or an output folder that cannot be written."""


@dataclass
class RunInfo:
    """What a run's config.yaml says about how its programs were earned."""

    path: str
    name: str
    mode: str
    proposer: str
    model: Optional[str]
    seeds: tuple[int, ...]
    check_affine: bool


@dataclass
class Candidate:
    """One earned entry of one run, with its task (from the benchmark) and, once verified, its verdict."""

    run: RunInfo
    entry: dict[str, Any]
    task: Any = None  # the benchmark Task, None if the key is unknown
    verdict: Any = None
    problem: Optional[str] = None  # why it cannot be written

    @property
    def key(self) -> str:
        return self.entry["task_key"]

    @property
    def mode(self) -> str:
        return "open" if self.entry.get("fns") is not None else self.run.mode

    @property
    def impl(self) -> str:
        return self.entry["impl"]

    def size(self) -> tuple[int, int]:
        from stepforge.loop.dedup import program_size

        return program_size(self.impl)


@dataclass
class Library:
    """What `build_library` wrote: the operators kept, the entries not written, the superseded ones."""

    out: Path
    written: list[Candidate] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)
    superseded: list[Candidate] = field(default_factory=list)


# ---------------------------------------------------------------------------
# reading runs


def read_run(run_dir: str | Path) -> tuple[RunInfo, list[dict[str, Any]]]:
    """The run's RunInfo and its earned buffer entries (seeded ones left out), as raw records."""
    from stepforge.config_io import read_mapping
    from stepforge.loop.interfaces import BufferEntry
    from stepforge.loop.runstore import BUFFER, CONFIG, RunStoreError, load_jsonl

    root = Path(run_dir)
    if not (root / CONFIG).is_file() or not (root / BUFFER).is_file():
        raise LibraryError(f"{root}: not a run directory of `stepforge improve` (no {CONFIG} or {BUFFER})")
    try:
        cfg = read_mapping(root / CONFIG, "settings (tasks, proposer, ...)")
        records = load_jsonl(root / BUFFER)
    except (RunStoreError, StepforgeError) as exc:
        raise LibraryError(str(exc).splitlines()[0]) from None
    mode = cfg.get("mode") or "closed"
    if mode not in ("closed", "open"):
        raise LibraryError(f"{root / CONFIG}: mode: expected closed or open, got {mode!r}")
    proposer = cfg.get("proposer") or {}
    backend = proposer.get("backend") or {}
    kind = proposer.get("kind") or ("llm" if backend else "search")
    if kind == "custom" and proposer.get("factory"):
        kind = f"custom ({proposer['factory']})"
    model = backend.get("model")
    if model and backend.get("lora_path"):
        model = f"{model} + {backend['lora_path']}"
    verifier = cfg.get("verifier") or {}
    info = RunInfo(path=str(root.resolve()), name=str(cfg.get("name") or root.name), mode=mode, proposer=kind,
                   model=model, seeds=tuple(int(s) for s in verifier.get("seeds") or (0, 1, 2)),
                   check_affine=bool(verifier.get("check_affine", True)))
    entries = []
    for number, record in enumerate(records, start=1):
        try:
            BufferEntry.model_validate(record)
        except ValueError as exc:
            raise LibraryError(f"{root / BUFFER}: line {number}: not a buffer entry: {str(exc).splitlines()[0]}") from None
        if record.get("source") is None:
            entries.append(record)
    return info, entries


def _candidates(run_dirs: Sequence[str | Path], tasks: dict[str, Any]) -> tuple[list[RunInfo], list[Candidate]]:
    runs, out = [], []
    for run_dir in run_dirs:
        info, entries = read_run(run_dir)
        if info.path in {r.path for r in runs}:
            continue
        runs.append(info)
        for entry in entries:
            c = Candidate(run=info, entry=entry, task=tasks.get(entry["task_key"]))
            if c.task is None:
                c.problem = "its task is not in the benchmark"
            out.append(c)
    return runs, out


# ---------------------------------------------------------------------------
# verifying


def _open_candidate(c: Candidate):
    """The entry as an open candidate for the verifier; None where this stepforge has no open mode."""
    try:
        from stepforge.benchmark.open_mode import OpenCandidate
    except ImportError:
        return None
    return OpenCandidate.model_validate({"fns": c.entry["fns"], "impl": c.impl})


def verify_candidates(cands: Sequence[Candidate], timeout_s: float, workers: int = 1) -> None:
    """Set each candidate's verdict (or `problem`), through the verifier pool with a time limit per program."""
    from stepforge.benchmark.pool import VerifierPool

    jobs = []
    for c in cands:
        if c.problem:
            continue
        if c.mode == "open":
            if c.entry.get("fns") is None:
                c.problem = "an open run's entry without fns"
                continue
            try:
                program = _open_candidate(c)
            except ValueError as exc:
                c.problem = f"its fns are not an open candidate: {str(exc).splitlines()[0]}"
                continue
            if program is None:
                c.problem = "open mode is not available in this stepforge; it cannot be verified"
                continue
        else:
            program = c.impl
        jobs.append((c, program))
    # one verify_many call per seed set (runs may differ in seeds)
    by_seeds: dict[tuple, list[tuple[Candidate, Any]]] = {}
    for c, program in jobs:
        by_seeds.setdefault((c.run.seeds, c.run.check_affine), []).append((c, program))
    if not by_seeds:
        return
    with VerifierPool(workers=max(1, min(workers, len(jobs))), timeout_s=timeout_s, tasks={}) as pool:
        for (seeds, affine), group in by_seeds.items():
            verdicts = pool.verify_many([(c.task, p) for c, p in group], seeds=seeds, check_affine=affine)
            for (c, _), v in zip(group, verdicts):
                c.verdict = v
                if not v.passed:
                    c.problem = f"no longer verifies: {v.short()}"


def choose(cands: Sequence[Candidate]) -> tuple[list[Candidate], list[Candidate], list[Candidate]]:
    """(kept, rejected, superseded): per (task, mode) the shortest verified program; the first given wins ties."""
    best: dict[tuple[str, str], Candidate] = {}
    rejected, superseded = [], []
    for c in cands:
        if c.problem:
            rejected.append(c)
            continue
        slot = (c.key, c.mode)
        old = best.get(slot)
        if old is None or c.size() < old.size():
            if old is not None:
                superseded.append(old)
            best[slot] = c
        else:
            superseded.append(c)
    order = {k: i for i, k in enumerate(dict.fromkeys(c.key for c in cands))}
    kept = sorted(best.values(), key=lambda c: (c.mode, order[c.key]))
    return kept, rejected, superseded


# ---------------------------------------------------------------------------
# writing


def operator_task(c: Candidate):
    """The operator as a task file: the benchmark task with the earned impl (and, open, the earned fns)."""
    from stepforge.benchmark.schema import Task

    if c.mode == "open":
        data = c.task.model_dump(mode="json", by_alias=True, exclude_none=True)
        data.update(fns=list(c.entry["fns"]), impl=c.impl)
        return Task.model_validate(data)
    return c.task.model_copy(update={"impl": c.impl})


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def operator_paths(c: Candidate) -> tuple[str, str]:
    """(YAML path, pytest path), relative to the library folder."""
    group, name = c.task.group or "tasks", c.task.test_name
    folder = f"{OPEN_DIR}/{group}" if c.mode == "open" else group
    suffix = "_open" if c.mode == "open" else ""
    return f"{folder}/{name}.yaml", f"{TESTS}/test_{_safe(group)}__{_safe(name)}{suffix}.py"


def _stats(impl: str) -> tuple[int, int]:
    from stepforge.benchmark.selection import program_stats

    s = program_stats(impl)
    return s.lines, s.copies


def _operator_record(c: Candidate, yaml_path: str, test_path: str) -> dict[str, Any]:
    import stepforge

    e, v = c.entry, c.verdict
    tol = c.task.tolerance.model_dump(exclude_none=True) if c.task.tolerance is not None else "computed"
    return {
        "operator": c.key, "mode": c.mode, "file": yaml_path, "test_file": test_path,
        "impl_sha256": hashlib.sha256(c.impl.encode()).hexdigest(),
        "earned": {"run": c.run.path, "run_name": c.run.name, "round": e.get("round"), "step": e.get("step"),
                   "temperature": e.get("temperature"), "success_rate": e.get("success_rate"),
                   "demonstrations": list(e.get("demonstrations") or []), "proposer": c.run.proposer,
                   "model": c.run.model},
        "verification": {"bindings": [{}] + [dict(b) for b in c.task.bindings], "seeds": list(c.run.seeds),
                         "check_affine": c.run.check_affine, "tolerance": tol, "task_fingerprint": c.task.fingerprint(),
                         "passed": v.passed, "runs": v.runs, "seconds": round(v.seconds, 4),
                         "stepforge_version": stepforge.__version__},
    }


def _not_written(c: Candidate) -> dict[str, Any]:
    return {"operator": c.key, "mode": c.mode, "run": c.run.path, "round": c.entry.get("round"), "why": c.problem}


def _index(lib: Library, runs: list[RunInfo], records: list[dict]) -> str:
    lines = ["# Operator library", "",
             f"{len(lib.written)} operators from {len(runs)} run(s), each verified again before it was written "
             f"(provenance: [{PROVENANCE}]({PROVENANCE})). Check one: `stepforge verify FILE`; all: `pytest {TESTS}`.",
             "", "| operator | group | mode | lines | Copies | run | round | demonstrations | proposer | model | file | test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, r in zip(lib.written, records):
        n_lines, copies = _stats(c.impl)
        demos = r["earned"]["demonstrations"]
        lines.append(f"| {c.key} | {c.task.group} | {c.mode} | {n_lines} | {copies} | {c.run.name} | "
                     f"{c.entry.get('round')} | {len(demos)}{' (' + ', '.join(demos) + ')' if demos else ''} | "
                     f"{c.run.proposer} | {c.run.model or '-'} | [{r['file']}]({r['file']}) | "
                     f"[{r['test_file']}]({r['test_file']}) |")
    if lib.rejected:
        lines += ["", f"## Not written ({len(lib.rejected)})", "", "| operator | mode | run | round | why |",
                  "| --- | --- | --- | --- | --- |"]
        for c in lib.rejected:
            why = (c.problem or "").replace("|", "\\|")
            lines.append(f"| {c.key} | {c.mode} | {c.run.name} | {c.entry.get('round')} | {why} |")
    if lib.superseded:
        lines += ["", f"## Superseded by a shorter verified program ({len(lib.superseded)})", "",
                  "| operator | mode | run | lines |", "| --- | --- | --- | --- |"]
        for c in lib.superseded:
            lines.append(f"| {c.key} | {c.mode} | {c.run.name} | {c.size()[0]} |")
    lines += ["", "## Runs", "", "| run | mode | proposer | model | seeds | path |", "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        lines.append(f"| {run.name} | {run.mode} | {run.proposer} | {run.model or '-'} | "
                     f"{', '.join(map(str, run.seeds))} | {run.path} |")
    return "\n".join(lines) + "\n"


def build_library(run_dirs: Sequence[str | Path], out: str | Path, timeout_s: Optional[float] = None,
                  workers: int = 1) -> Library:
    """Verify the runs' earned programs again and write the verified ones as a library in `out`."""
    from stepforge.benchmark.export import write_export
    from stepforge.benchmark.pool import DEFAULT_TIMEOUT_S
    from stepforge.benchmark.schema import load_benchmark
    from stepforge.loop.runstore import atomic_write_text

    if not run_dirs:
        raise LibraryError("give at least one run directory")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LibraryError(f"{out}: exists and is not an empty folder; give a new --out")
    runs, cands = _candidates(run_dirs, load_benchmark())
    verify_candidates(cands, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s, workers)
    kept, rejected, superseded = choose(cands)
    lib = Library(out=out, written=kept, rejected=rejected, superseded=superseded)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for c in kept:
        yaml_path, test_path = operator_paths(c)
        task = operator_task(c)
        (out / yaml_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / yaml_path, task.to_yaml())
        write_export(task, c.impl, out / test_path, c.run.seeds)
        records.append(_operator_record(c, yaml_path, test_path))
    import stepforge

    provenance = {"stepforge_version": stepforge.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "runs": [vars(r) | {"seeds": list(r.seeds)} for r in runs], "operators": records,
                  "not_written": [_not_written(c) for c in rejected],
                  "superseded": [_not_written(c) | {"why": "a shorter verified program was kept"} for c in superseded]}
    atomic_write_text(out / PROVENANCE, json.dumps(provenance, indent=2) + "\n")
    atomic_write_text(out / INDEX, _index(lib, runs, records))
    return lib


__all__ = ["Candidate", "Library", "LibraryError", "RunInfo", "build_library", "choose", "operator_paths",
           "operator_task", "read_run", "verify_candidates"]
