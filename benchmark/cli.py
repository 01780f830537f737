"""`stepforge tasks`, `stepforge verify`, `stepforge export`.

Exit codes of `verify`: 0 passed, 1 not passed, 2 a bad task file, an unknown
task or a bad argument (one error line on stderr). `verify` runs in the
verifier's process pool (benchmark/pool.py), never in this process: a
verification past `--timeout` seconds (default: the pool's per-call limit) is
stopped with its worker and gets the verdict stage `timeout`, whether the
program, an oracle or the task's `global` is slow. Heavy imports (torch, the
simulator) happen inside the commands.

`--open` poses tasks in open mode (docs/language.md, section 5a): `verify TASK
--open --impl CANDIDATE.yaml` verifies a candidate's own fns and program
(without `--impl`: the task's fns and impl as a candidate), `tasks --open`
lists the tasks that can be posed openly.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from stepforge.errors import cli_errors, fail


def _task_error_line(exc) -> str:
    more = len(exc.errors) - 1
    return exc.message + (f" (and {more} more problem(s); see the file)" if more > 0 else "")


def _load_task(key_or_file: str, root: Optional[Path]):
    from stepforge.benchmark.schema import TaskFileError, resolve_task

    try:
        return resolve_task(key_or_file, root)
    except TaskFileError as exc:
        fail(_task_error_line(exc))
    except KeyError as exc:
        fail(exc.args[0] if exc.args else str(exc))


def read_impl(path: Path) -> str:
    """A program from a file: plain STeP text, or a task-like YAML with an `impl:` key; `-` reads stdin.

    `ConfigError` naming the file when it is not UTF-8 or its YAML is refused (see `config_io.read_yaml_text`).
    """
    from stepforge.config_io import YamlError, decode_text, read_text_file, read_yaml_text

    text = decode_text(sys.stdin.buffer.read(), "<stdin>") if str(path) == "-" else read_text_file(path, "program file")
    if path.suffix in (".yaml", ".yml"):
        try:
            data = read_yaml_text(text, str(path))
        except YamlError:
            if re.search(r"^impl[ \t]*:", text, re.M):
                raise  # a task-like file that the reader refuses (bad YAML, a duplicate key, an alias bomb)
            data = None
        if isinstance(data, dict) and isinstance(data.get("impl"), str):
            return data["impl"]
    return text


def _parse_seeds(seeds: int) -> tuple[int, ...]:
    if seeds < 1:
        fail("--seeds must be at least 1")
    return tuple(range(seeds))


def _parse_binding(text: Optional[str]) -> Optional[list[dict[str, int]]]:
    """`--binding D=8,N=3` (repeatable with `;`)."""
    if not text:
        return None
    out = []
    for part in text.split(";"):
        b = {}
        for item in part.split(","):
            if not item.strip():
                continue
            name, _, value = item.partition("=")
            value = value.strip()
            digits = value.isascii() and value.isdigit() and len(value) <= 10
            if not name.strip().isidentifier() or not digits or not 0 < int(value) <= 2**31:
                fail(f"--binding: expected SYM=positive int pairs such as D=8,N=3, got {item.strip()[:40]!r}")
            b[name.strip()] = int(value)
        out.append(b)
    return out


def _check_timeout(timeout: Optional[float]) -> float:
    if timeout is None:
        from stepforge.benchmark.pool import DEFAULT_TIMEOUT_S

        return DEFAULT_TIMEOUT_S
    if not 0 < timeout < float("inf"):
        fail(f"--timeout must be a positive number of seconds, got {timeout:g}")
    return timeout


def _verify_in_pool(jobs: list, timeout: float, workers: int = 1, **kwargs) -> list:
    """Verdicts of `(task, program)` jobs, each in a pool worker under `timeout` seconds."""
    from stepforge.benchmark.pool import PoolError, VerifierPool
    from stepforge.benchmark.schema import TaskFileError

    try:
        with VerifierPool(workers=max(1, min(workers, len(jobs))), timeout_s=timeout, tasks={}) as pool:
            return pool.verify_many(jobs, **kwargs)
    except TaskFileError as exc:
        fail(_task_error_line(exc))
    except PoolError as exc:
        fail(f"the verifier workers failed: {str(exc).splitlines()[0]}")


def _program(task, impl: Optional[Path]) -> str:
    """The program text from `--impl` (a file, or - for stdin), else the task's reference impl."""
    if impl is not None:
        if str(impl) != "-" and not impl.is_file():
            fail(f"--impl {impl}: no such file")
        with cli_errors():
            return read_impl(impl)
    if not task.impl:
        fail(f"task {task.key} has no reference impl; pass the program with --impl")
    return task.impl


def _open_candidate(task, impl: Optional[Path]):
    """The open candidate of `--impl` (parsed, never run), else the task's own; or a `fns` verdict if malformed."""
    from stepforge.benchmark.open_mode import CandidateError, load_candidate, reference_candidate
    from stepforge.benchmark.verdict import failed

    if not task.open:
        fail(f"task {task.key} cannot be posed in open mode (open: false)")
    if impl is None:
        if not task.impl:
            fail(f"task {task.key} has no reference impl; pass the candidate with --impl")
        return reference_candidate(task)
    if str(impl) != "-" and not impl.is_file():
        fail(f"--impl {impl}: no such file")
    text = sys.stdin.read() if str(impl) == "-" else impl.read_text(encoding="utf-8")
    try:
        return load_candidate(text)
    except CandidateError as exc:
        return failed("fns", str(exc), task=task.key)


def register(app: typer.Typer) -> None:
    """Add the benchmark's commands to the root `stepforge` app."""

    @app.command("tasks")
    def tasks_cmd(
        patterns: Optional[list[str]] = typer.Argument(None, help="task keys, globs or split names (published, new, all)"),
        split: Optional[str] = typer.Option(None, "--split", help="published, new or all"),
        groups: Optional[list[str]] = typer.Option(None, "--group", help="a group name or glob (repeatable)"),
        difficulty: Optional[list[str]] = typer.Option(None, "--difficulty", help="easy, medium or hard (repeatable)"),
        mode: Optional[str] = typer.Option(None, "--mode", help="closed or open: the tasks posable in that mode"),
        root: Optional[Path] = typer.Option(None, help="benchmark folder (default: the packaged tasks)"),
        as_json: bool = typer.Option(False, "--json", help="one JSON object per task"),
        open_mode: bool = typer.Option(False, "--open", help="only the tasks that can be posed in open mode"),
    ) -> None:
        """List the benchmark tasks: key, group, split, difficulty, number of fns, reference lines and Copies."""
        from stepforge.benchmark.schema import TaskFileError, load_benchmark
        from stepforge.benchmark.selection import select, split_of, task_difficulty
        from stepforge.errors import ConfigError

        try:
            tasks = load_benchmark(root)
        except TaskFileError as exc:
            fail(_task_error_line(exc))
        if open_mode:  # --open is --mode open
            if mode not in (None, "open"):
                fail(f"--open selects the open-mode tasks; it contradicts --mode {mode}")
            mode = "open"
        spec = {k: v for k, v in dict(split=split, keys=patterns, groups=groups, difficulty=difficulty,
                                      mode=mode).items() if v}
        try:
            tasks = {k: tasks[k] for k in select(spec, tasks, "tasks")} if spec else tasks
        except ConfigError as exc:
            fail(str(exc).splitlines()[0])
        rows = []
        for key, t in tasks.items():
            rows.append({"key": key, "group": t.group, "test_name": t.test_name, "split": split_of(key),
                         "difficulty": task_difficulty(t), "fns": len(t.fns),
                         "lines": t.reference_lines(), "copies": (t.impl or "").count("step.Copy()"),
                         "bindings": len(t.bindings)})
        if as_json:
            for r in rows:
                typer.echo(json.dumps(r))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} tasks" + (" (open mode)" if mode == "open" else ""))
        cols = ("key", "group", "split", "difficulty", "fns", "lines", "copies", "bindings")
        for col in cols:
            table.add_column(col, justify="right" if col in ("fns", "lines", "copies", "bindings") else "left")
        for r in rows:
            table.add_row(*(str(r[c] if r[c] is not None else "-") for c in cols))
        Console(width=160).print(table)

    @app.command("verify")
    def verify_cmd(
        task: Optional[str] = typer.Argument(None, help="a task key (group/id), a unique id, or a task file"),
        impl: Optional[Path] = typer.Option(
            None, "--impl", help="the program to verify (default: the task's reference impl); - reads stdin"),
        seeds: int = typer.Option(3, "--seeds", help="number of input seeds (0, 1, ...)"),
        as_json: bool = typer.Option(False, "--json", help="print the verdict as JSON"),
        open_mode: bool = typer.Option(
            False, "--open", help="open mode: --impl is a candidate YAML with fns and impl (default: the task's own)"),
        all_tasks: bool = typer.Option(False, "--all", help="verify every benchmark task's reference solution"),
        binding: Optional[str] = typer.Option(None, "--binding", help="sizes instead of the defaults + task bindings, e.g. D=8,N=3;D=32"),
        engine: str = typer.Option("vectorised", help="vectorised or naive"),
        no_affine: bool = typer.Option(False, "--no-affine", help="score function only; report the affine rule separately"),
        root: Optional[Path] = typer.Option(None, help="benchmark folder (default: the packaged tasks)"),
        timeout: Optional[float] = typer.Option(
            None, "--timeout", metavar="SECONDS",
            help="time limit per verification (default: the process pool's, DEFAULT_TIMEOUT_S in benchmark/pool.py); "
                 "past it the verdict is `timeout`"),
    ) -> None:
        """Verify a program against a task (exit 0 passed, 1 not passed, 2 bad task/arguments)."""
        seed_list = _parse_seeds(seeds)
        bindings = _parse_binding(binding)
        limit = _check_timeout(timeout)
        if engine not in ("vectorised", "naive"):
            fail(f"--engine must be vectorised or naive, got {engine!r}")
        options = dict(seeds=seed_list, bindings=bindings, engine=engine, check_affine=not no_affine)
        if all_tasks:
            if task is not None or impl is not None:
                fail("--all verifies the reference solutions; give no task and no --impl with it")
            raise typer.Exit(_verify_all(root, limit, as_json, options, open_mode))
        if task is None:
            fail("give a task key or file (see `stepforge tasks`), or --all")
        t = _load_task(task, root)
        from stepforge.benchmark.verdict import Verdict

        program = _open_candidate(t, impl) if open_mode else _program(t, impl)
        if isinstance(program, Verdict):  # a candidate that is not {fns, impl} YAML
            verdict = program
        else:
            verdict = _verify_in_pool([(t, program)], limit, **options)[0]
        if as_json:
            typer.echo(verdict.model_dump_json(indent=2))
        else:
            typer.echo(f"{t.key}: {verdict.short()}")
            if not verdict.passed and verdict.functional_ok:
                typer.echo("  (functionally correct; it fails the affine rule)")
            typer.echo("  " + ", ".join(f"{k} {v:.3f}s" for k, v in verdict.timings.items()))
        raise typer.Exit(0 if verdict.passed else 1)

    @app.command("export")
    def export_cmd(
        task: str = typer.Argument(..., help="a task key (group/id), a unique id, or a task file"),
        impl: Optional[Path] = typer.Option(None, "--impl", help="the program (default: the task's reference impl)"),
        out: Path = typer.Option(..., "--out", help="the pytest file to write, e.g. test_bmm0.py"),
        seeds: int = typer.Option(3, "--seeds", help="number of input seeds the test uses"),
        root: Optional[Path] = typer.Option(None, help="benchmark folder (default: the packaged tasks)"),
        open_mode: bool = typer.Option(
            False, "--open", help="open mode: --impl is a candidate YAML with fns and impl (default: the task's own)"),
    ) -> None:
        """Write a standalone pytest file that checks a program (or an open candidate) against a task."""
        from stepforge.benchmark.export import write_export

        t = _load_task(task, root)
        if open_mode:
            from stepforge.benchmark.open_mode import reference_candidate

            if impl is not None and str(impl) != "-" and not impl.is_file():
                fail(f"--impl {impl}: no such file")
            program = (sys.stdin.read() if str(impl) == "-" else impl.read_text(encoding="utf-8")) \
                if impl is not None else reference_candidate(t).to_yaml()
        else:
            program = _program(t, impl)
        try:
            path = write_export(t, program, out, _parse_seeds(seeds), open_mode)
        except (ValueError, OSError) as exc:
            fail(str(exc))
        typer.echo(f"wrote {path} (run: pytest {path})")


def _verify_all(root, timeout: float, as_json: bool, options: dict, open_mode: bool = False) -> int:
    from stepforge.benchmark.open_mode import reference_candidate
    from stepforge.benchmark.schema import TaskFileError, load_benchmark

    try:
        tasks = load_benchmark(root)
    except TaskFileError as exc:
        fail(_task_error_line(exc))
    with_impl = [t for t in tasks.values() if t.impl and (t.open or not open_mode)]
    jobs = [(t, reference_candidate(t) if open_mode else t.impl) for t in with_impl]
    results = _verify_in_pool(jobs, timeout, workers=min(2, os.cpu_count() or 1), **options) if jobs else []
    verdicts = {t.key: v for t, v in zip(with_impl, results)}
    n_pass = sum(v.passed for v in verdicts.values())
    if as_json:
        typer.echo(json.dumps({k: v.model_dump() for k, v in verdicts.items()}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        mode = " (open mode)" if open_mode else ""
        table = Table(title=f"reference solutions{mode}: {n_pass}/{len(verdicts)} passed")
        for col in ("task", "result", "runs", "seconds", "message"):
            table.add_column(col, overflow="fold")
        for key, v in verdicts.items():
            table.add_row(key, "PASS" if v.passed else f"FAIL {v.stage}", str(v.runs),
                          f"{v.timings.get('total', 0):.3f}", v.message)
        Console(width=160).print(table)
    return 0 if n_pass == len(verdicts) else 1


__all__ = ["read_impl", "register"]
