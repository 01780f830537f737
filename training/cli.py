"""`stepforge train sft` and `stepforge ablate`.

Expected failures (a bad config or override, a missing run directory or
model, an empty dataset, an example longer than max_length, a failed arm)
print one line per problem on stderr and exit with status 2, never a
traceback. Heavy imports (torch, trl, peft) happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stepforge.errors import cli_errors, fail


def _split_list(values: Optional[list[str]]) -> list[str]:
    """Repeatable options that also accept comma-separated values."""
    out: list[str] = []
    for value in values or []:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def register(app: typer.Typer) -> None:
    """Add `train sft` and `ablate` to the root app."""
    train_app = typer.Typer(no_args_is_help=True, help="Fine-tune a model on earned experience (SFT with LoRA).")
    app.add_typer(train_app, name="train")

    @train_app.command("sft")
    def sft_cmd(
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="a `stepforge improve` run directory: its buffer is the data"),
        model: Path = typer.Option(..., "--model", help="the base model: a local checkpoint directory"),
        out: Path = typer.Option(..., "--out", help="folder for the adapter and tokenizer (use as proposer.backend.lora_path)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="SFT settings (YAML, e.g. configs/sft_default.yaml)"),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override a setting: key.path=value (repeatable)"),
        extra_tasks: Optional[list[str]] = typer.Option(
            None, "--extra-tasks", help="add these tasks' reference solutions (keys or globs; repeatable or comma-separated)"),
        merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="also write the merged model to OUT/merged"),
        dry_run: bool = typer.Option(False, "--dry-run", help="build and write the dataset (OUT/dataset.jsonl) only"),
    ) -> None:
        """Train a LoRA adapter on a run's buffer (and extra solved tasks) with trl's SFTTrainer."""
        from stepforge.training.pipeline import run_sft

        extras = _split_list(extra_tasks)
        if run_dir is None and not extras and not config:
            fail("give --run-dir RUN (its buffer is the data) and/or --extra-tasks KEYS")
        with cli_errors():
            outcome = run_sft(run_dir=run_dir, model=model, out=out, config=config, overrides=list(set_ or []),
                              extra_tasks=extras, merge=merge, dry_run=dry_run)
        ds = outcome.dataset.summary()
        typer.echo(f"dataset: {ds['examples']} examples ({ds['from_buffer']} from the buffer, "
                   f"{ds['from_extra']} extra tasks)" + (f"; skipped: {', '.join(ds['skipped'])}" if ds["skipped"] else ""))
        if outcome.result is None:
            typer.echo(f"wrote {outcome.out / 'dataset.jsonl'} (dry run: nothing trained)")
            return
        r = outcome.result
        loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "-"
        typer.echo(f"trained {r.steps} steps in {r.seconds:.1f} s (train loss {loss}); adapter + tokenizer: {r.adapter_dir}"
                   + (f"; merged model: {r.merged_dir}" if r.merged_dir else ""))
        typer.echo(f"evaluate: stepforge improve --config CONFIG --set proposer.backend.model={outcome.model} "
                   f"--set proposer.backend.lora_path={r.adapter_dir}")
        if outcome.settings.lora.modules_to_save:
            typer.echo(f"note: the adapter trains {', '.join(outcome.settings.lora.modules_to_save)} in full; "
                       f"vLLM's LoRA cannot load it: serve the merged model (--merge) with kind vllm")

    @app.command("ablate")
    def ablate_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="ablation config (YAML, e.g. configs/ablate_tiny.yaml)"),
        run_dir: Optional[Path] = typer.Option(
            None, "--run-dir", help="ablation directory (default runs/<name>-<time>); an existing one is resumed"),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: key.path=value (repeatable)"),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress output of the arms on stderr"),
    ) -> None:
        """SFT versus in-context self-improvement: base, base+si, sft, sft+si on one split; one table and plot."""
        from stepforge.training.ablate import run_ablation

        with cli_errors():
            outcome = run_ablation(config, run_dir=run_dir, overrides=list(set_ or []), progress=progress)
        typer.echo(outcome.markdown)
        typer.echo(f"wrote {outcome.run_dir / 'ablation.md'}, ablation.csv, ablation.json, ablation.png")
