"""`stepforge train sft` as a function: settings -> dataset -> adapter.

`run_sft(run_dir=..., model=..., out=..., config=..., overrides=...,
extra_tasks=..., merge=...)` loads `SFTSettings` (YAML + `--set`), builds the
chat dataset from the run's buffer and the extra tasks (`training/data.py`),
and trains and saves the adapter (`training/sft.py`). `dry_run` writes the
dataset only. The ablation calls the same function for its SFT arms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .data import BuiltDataset, build_dataset, write_dataset
from .settings import SFTSettings, load_sft_settings
from .sft import DATASET_FILE, SFTResult, TrainingError, train_sft


@dataclass
class SFTOutcome:
    out: Path
    model: Path
    settings: SFTSettings
    dataset: BuiltDataset
    result: Optional[SFTResult]


def run_sft(*, run_dir: str | Path | None, model: str | Path, out: str | Path, config: str | Path | None = None,
            overrides: Sequence[str] = (), extra_tasks: Sequence[str] = (), merge: bool | None = None,
            dry_run: bool = False, settings: SFTSettings | None = None,
            only_tasks: Sequence[str] | None = None) -> SFTOutcome:
    """Build the dataset and train (unless `dry_run`); `settings` replaces config + overrides when given."""
    settings = settings or load_sft_settings(config, list(overrides))
    model_dir = Path(model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise TrainingError(f"--model {model}: not a model directory (no config.json)")
    dataset = build_dataset(run_dir, settings.data, settings.prompt, extra_tasks, only_tasks)
    if not dataset.examples:
        skipped = f" (skipped: {', '.join(dataset.skipped)})" if dataset.skipped else ""
        raise TrainingError(f"the dataset is empty: no usable buffer entry and no extra task{skipped}")
    out_dir = Path(out)
    sources = {"run_dir": str(Path(run_dir).resolve()) if run_dir else None, **dataset.summary()}
    if dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_dataset(out_dir / DATASET_FILE, dataset.examples)
        return SFTOutcome(out_dir, model_dir, settings, dataset, None)
    result = train_sft(dataset.examples, model_dir, out_dir, settings, merge=merge, sources=sources)
    return SFTOutcome(out_dir, model_dir, settings, dataset, result)


__all__ = ["SFTOutcome", "run_sft"]
