"""Validated configuration of a model backend, loadable from YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from stepforge.config_io import StrictModel, read_yaml_file, validate

from .errors import ConfigError

BackendKind = Literal["hf", "vllm", "openai"]

# The `max_lora_rank` values vLLM's LoRAConfig accepts (its MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class BackendConfig(StrictModel):
    """Everything needed to build one backend instance.

    `model` is a local checkpoint directory for `hf` and `vllm`, and the served
    model name for `openai`. Unknown keys are rejected so typos surface early.
    """

    model_config = ConfigDict(extra="forbid")

    kind: BackendKind = "hf"
    model: str = Field(min_length=1)
    served_model_name: str | None = None
    tokenizer: str | None = None
    # OpenAI-compatible HTTP
    base_url: str | None = None
    api_key: str | None = None
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    # top_k and repetition_penalty are not OpenAI API fields: they go as extra
    # body fields (vLLM, stepforge serve and llama.cpp read them). Set false for
    # servers that reject unknown fields; requests must then leave them off.
    extra_sampling_fields: bool = True
    # local engines
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=2)
    batch_size: int = Field(default=8, ge=1)
    lora_path: str | None = None
    # vLLM
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    max_lora_rank: int | None = None
    seed: int = Field(default=0, ge=0)  # the engine's global seed (vLLM V1's default is 0)
    batch_invariant: bool = False  # VLLM_BATCH_INVARIANT=1: outputs independent of batching (NVIDIA, compute capability >= 8)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Ray
    num_gpus: float | None = Field(default=None, ge=0)
    startup_timeout_s: float = Field(default=600.0, gt=0)  # how long a replica may take to load its engine

    @field_validator("max_lora_rank")
    @classmethod
    def _lora_rank(cls, value: int | None) -> int | None:
        if value is not None and value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {list(VLLM_LORA_RANKS)} (vLLM's allowed ranks), got {value}")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> "BackendConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("kind 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.kind != "vllm" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size applies to kind 'vllm' only")
        if self.num_gpus is not None:
            self._check_num_gpus(self.num_gpus)
        return self

    def _check_num_gpus(self, gpus: float) -> None:
        # A Ray actor sees only the GPUs it reserves: fewer than its engine uses is a config error.
        tp = self.tensor_parallel_size
        if self.kind == "vllm" and gpus < tp and not (tp == 1 and gpus > 0):
            raise ValueError(f"num_gpus {gpus:g} is below tensor_parallel_size {tp}: each replica must reserve "
                             f"the {tp} GPU(s) its engine uses (a fraction of one GPU only shares it when tp is 1)")
        if self.kind == "hf" and self.device == "cuda" and gpus == 0:
            raise ValueError("num_gpus 0 with device 'cuda': the replica would use a GPU it does not reserve")

    @property
    def name(self) -> str:
        """The model name shown to clients (served name, else the model string)."""
        return self.served_model_name or self.model

    def resolved_api_key(self) -> str:
        """The API key: configured, else $OPENAI_API_KEY, else a placeholder."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def actor_num_gpus(self) -> float:
        """GPUs a Ray actor hosting this backend must reserve."""
        if self.num_gpus is not None:
            return self.num_gpus
        if self.kind == "vllm":
            return float(self.tensor_parallel_size)
        if self.kind == "hf" and self.device == "cuda":
            return 1.0
        return 0.0


SECTION_KEYS = ("backend", "proposer.backend")


def load_backend_config(path: str | Path, key: str | None = None) -> BackendConfig:
    """Read a YAML file and validate its backend section.

    `key` is a dotted path to the section (e.g. `proposer.backend`). Without
    one, the first of `backend` and `proposer.backend` that exists is used
    (so an experiment config works as is), else the whole document. Errors
    name the file and the offending key.
    """
    path = Path(path)
    data = read_yaml_file(path)
    keys = [key] if key else [k for k in SECTION_KEYS if _lookup(data, k) is not None]
    where = str(path)
    if keys:
        section = _lookup(data, keys[0])
        if section is None:
            raise ConfigError(f"{path}: no section {keys[0]!r}")
        data, where = section, f"{path}: {keys[0]}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of backend settings")
    return config_from_dict(data, where)


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> BackendConfig:
    """Validate a mapping into a BackendConfig, raising ConfigError with key names."""
    return validate(BackendConfig, data, where, what="backend settings")
