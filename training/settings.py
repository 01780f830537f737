"""Validated settings of SFT (`SFTSettings`), loadable from `configs/sft_*.yaml`.

Every key has a default, so `{}` is a valid file. `load_sft_settings(path,
overrides)` reads the YAML, applies `--set key.path=value` overrides (the same
syntax as `stepforge improve --set`) and validates; any problem is a
`TrainingConfigError` whose text is one line per problem,
`FILE: key.path: what was expected`.

Sections:

- `lora`: the peft LoRA adapter (rank `r`, `alpha`, `dropout`,
  `target_modules` = a list of module names or `all-linear`).
- training: `learning_rate`, `epochs` (or `max_steps` > 0, which wins),
  `batch_size`, `grad_accum`, `max_length` (tokens of prompt + answer; an
  example longer than it is an error, never silently truncated), `seed`,
  `lr_scheduler`, `warmup_ratio`, `weight_decay`, `precision` (`auto` = bf16
  on a CUDA device that supports it, else fp32), `gradient_checkpointing`.
- `data`: which examples: the earned buffer entries (`min_success_rate`,
  `max_success_rate`), extra solved tasks (`extra_tasks`: keys or globs whose
  reference solutions are added, `extra_tasks_exclude_buffer`), how many times
  each example is repeated (`repeat`), and what to do with a buffer entry
  that has no recorded prompt (`missing_prompt`: rebuild it like the loop
  does, or skip the entry).
- `prompt`: how prompts of extra tasks (and of rebuilt buffer entries) are
  made: `loop_config`, an improve config whose proposer prompt settings
  (`proposer.style`, `proposer.knowledge`) are used, or inline `style` and
  `knowledge` (`full` | `none`), which mean exactly what `proposer.style` /
  `proposer.knowledge` of an improve config mean.
- `merge`: also write a merged full model (`OUT/merged`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from stepforge import config_io
from stepforge.config_io import StrictModel, read_mapping, validate
from stepforge.errors import ConfigError


class TrainingConfigError(ConfigError):
    """A bad SFT / ablation / sweep config or override; `str()` names the file, key and expectation."""


class LoraSettings(StrictModel):
    """The LoRA adapter: low-rank updates of the named linear modules."""

    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    # modules trained in full and saved with the adapter (e.g. [norm], the final RMSNorm, which lets a
    # tiny model sharpen its output distribution); vLLM's LoRA cannot serve these: merge (--merge) instead
    modules_to_save: list[str] = Field(default_factory=list)
    modules_to_save_lr: Optional[float] = Field(default=None, gt=0)  # their learning rate (None: learning_rate)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("expected a non-empty list of module names (e.g. [q_proj, v_proj]) or 'all-linear'")
            if any(not isinstance(m, str) or not m.strip() for m in v):
                raise ValueError(f"expected module names as non-empty strings, got {v}")
        return v


class DataSettings(StrictModel):
    """Which examples the dataset holds."""

    min_success_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    max_success_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    extra_tasks: list[str] = Field(default_factory=list)
    extra_tasks_exclude_buffer: bool = True
    repeat: int = Field(default=1, ge=1)
    missing_prompt: Literal["rebuild", "skip"] = "rebuild"
    # recorded: a buffer entry's own prompt (what the proposer saw); rebuild: every prompt made anew with
    # the `prompt` settings (and the entry's demonstrations), e.g. to train on the compact prompt
    prompts: Literal["recorded", "rebuild"] = "recorded"

    @field_validator("extra_tasks", mode="before")
    @classmethod
    def _tasks(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @model_validator(mode="after")
    def _range(self) -> "DataSettings":
        if self.min_success_rate > self.max_success_rate:
            raise ValueError(f"min_success_rate ({self.min_success_rate}) must not exceed "
                             f"max_success_rate ({self.max_success_rate})")
        return self


class PromptSettings(StrictModel):
    """How the loop's prompt builder is called for tasks without a recorded prompt.

    `style` and `knowledge` are the improve config's `proposer.style` and
    `proposer.knowledge`. `loop_config` (an improve config file) wins over the
    inline values, so SFT data and the evaluation run can share one file.
    """

    loop_config: Optional[str] = None
    style: Literal["ir", "python"] = "ir"
    knowledge: Literal["full", "none"] = "full"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "options" in data:
            raise ValueError("options: replaced by prompt.knowledge (full | none), the improve config's "
                             "proposer.knowledge; write `knowledge: none` instead of `options: {knowledge: none}`")
        return data


class SFTSettings(StrictModel):
    """Everything that shapes one SFT run (see the module docstring)."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: float = Field(default=3.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=4096, ge=8)
    seed: int = Field(default=0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    merge: bool = False
    data: DataSettings = Field(default_factory=DataSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)

    @model_validator(mode="after")
    def _steps(self) -> "SFTSettings":
        if self.max_steps == 0:
            raise ValueError("max_steps: expected -1 (train for `epochs`) or a positive number of steps")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------------------
# loading


def validate_model(model: type[BaseModel], data: dict, where: str, set_keys: set[str] | None = None):
    """`model.model_validate(data)` with errors as one TrainingConfigError (one line per problem)."""
    return validate(model, data, where, set_keys, error=TrainingConfigError)


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict:
    """A YAML file's top-level mapping; TrainingConfigError naming the file otherwise."""
    try:
        return read_mapping(path, what)
    except ConfigError as exc:
        raise TrainingConfigError(str(exc)) from None


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, set[str]]:
    """`--set key.path=value` overrides (the shared parser), errors as TrainingConfigError."""
    try:
        return config_io.apply_overrides(data, overrides)
    except ConfigError as exc:
        raise TrainingConfigError(str(exc)) from None


def load_sft_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> SFTSettings:
    """Read `path` (None: all defaults), apply `--set` overrides, validate."""
    data = read_yaml_mapping(path) if path is not None else {}
    where = str(path) if path is not None else "sft settings"
    data, keys = apply_overrides(data, list(overrides or []))
    return validate_model(SFTSettings, data, where, keys)


__all__ = [
    "DataSettings",
    "LoraSettings",
    "PromptSettings",
    "SFTSettings",
    "TrainingConfigError",
    "apply_overrides",
    "load_sft_settings",
    "read_yaml_mapping",
    "validate_model",
]
