"""`stepforge improve`, `stepforge library` and `stepforge report`.

Expected failures (a bad config or override, a missing model directory, a
run directory in use or not resumable, a broken task file, a backend that
cannot start) print one line per problem on stderr and exit with status 2;
they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stepforge.errors import EXIT_INTERRUPTED, cli_errors, fail


def print_summary(summary: dict, run_dir: Path, stream=None) -> None:
    """A short table: per round, then totals."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream or sys.stdout, width=120)
    table = Table(title=f"{summary.get('name')} ({summary.get('variant')}): {summary['status']}, "
                        f"{summary.get('stop_reason') or '-'}")
    for col in ("round", "steps", "samples", "correct", "new solved", "solved", "prompt tok", "completion tok", "s"):
        table.add_column(col, justify="right")
    for r in summary["rounds"]:
        table.add_row(str(r["round"]), str(r["steps"]), str(r.get("samples", 0)), str(r.get("correct", 0)),
                      str(len(r["solved"])), str(r["solved_total"]), str(r.get("prompt_tokens", 0)),
                      str(r.get("completion_tokens", 0)), f"{r['seconds']:.1f}")
    console.print(table)
    run = summary["run"]
    console.print(f"tasks solved {run['tasks_solved']}/{run['tasks']} ({100 * run['task_completion']:.1f}%), "
                  f"{run['samples']} samples, {run['verifications']} verifications, "
                  f"{run['prompt_tokens']} prompt + {run['completion_tokens']} completion tokens, "
                  f"{run['wall_seconds']:.1f} s")
    console.print(f"run directory: {run_dir} (report: {run_dir / 'report.md'})")


def register(app: typer.Typer) -> None:
    """Add `improve`, `library` and `report` to the root app."""

    @app.command("improve")
    def improve_cmd(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="experiment config (YAML)"),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="new run directory (default runs/<name>-<time>)"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory"),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: key.path=value (repeatable)"),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress output on stderr"),
    ) -> None:
        """Run adaptive self-improvement (Algorithm 1) on the benchmark; write a run directory and its report."""
        if resume is not None and run_dir is not None:
            fail("--resume continues a run in its own directory; leave out --run-dir")
        if resume is None and config is None:
            fail("give --config FILE for a new run (e.g. configs/default.yaml), or --resume RUN_DIR")
        from stepforge.loop.job import run_improve

        try:
            with cli_errors():
                outcome = run_improve(config, run_dir=run_dir, resume=resume, overrides=list(set_ or []),
                                      progress=progress)
        except KeyboardInterrupt as exc:
            where = getattr(exc, "run_dir", None) or resume or run_dir
            if where is None:
                typer.echo("interrupted before the run directory was made", err=True)
            else:
                typer.echo(f"interrupted; continue with: stepforge improve --resume {where}", err=True)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
        if outcome.result is None:
            typer.echo(f"{outcome.run_dir}: the run had already finished; summary and report rewritten", err=True)
        print_summary(outcome.summary, outcome.run_dir)

    @app.command("library")
    def library_cmd(
        run_dirs: list[Path] = typer.Argument(..., help="run directories of `stepforge improve`"),
        out: Path = typer.Option(..., "--out", help="the library folder to write (new or empty)"),
        timeout: Optional[float] = typer.Option(None, "--timeout", metavar="SECONDS",
                                                help="time limit per verification (default: the pool's)"),
        workers: int = typer.Option(2, "--workers", min=1, help="verifier worker processes"),
    ) -> None:
        """Write the runs' earned programs, each verified again, as an operator library (YAML, pytest, index)."""
        from stepforge.loop.library import INDEX, build_library

        if timeout is not None and not 0 < timeout < float("inf"):
            fail(f"--timeout must be a positive number of seconds, got {timeout:g}")
        with cli_errors():
            lib = build_library(run_dirs, out, timeout, workers)
        typer.echo(f"wrote {len(lib.written)} operators to {out} (index: {out / INDEX}); "
                   f"{len(lib.rejected)} not written, {len(lib.superseded)} superseded")
        for c in lib.rejected:
            typer.echo(f"  not written: {c.key} ({c.mode}, {c.run.name}): {c.problem}")

    @app.command("report")
    def report_cmd(
        run_dirs: list[Path] = typer.Argument(..., help="run directories of `stepforge improve`"),
        compare: Optional[Path] = typer.Option(None, "--compare", help="also write families.md/.png comparing the runs here"),
    ) -> None:
        """Write summary.json, report.md and plots (PNG) for each run; with --compare, solved per family across runs."""
        from stepforge.loop.reporting.report import PLOTS, write_report

        for run_dir in run_dirs:
            with cli_errors():
                summary = write_report(run_dir)
            typer.echo(f"wrote {run_dir / 'report.md'}, {run_dir / 'summary.json'}, "
                       + ", ".join(str(run_dir / p) for p in PLOTS if (run_dir / p).is_file()))
            print_summary(summary, run_dir)
        if compare is not None:
            from stepforge.loop.reporting.families import compare_runs

            with cli_errors():
                path = compare_runs(run_dirs, compare)
            typer.echo(f"wrote {path} and its plot")
