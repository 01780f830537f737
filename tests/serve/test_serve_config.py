"""Backend configs: validation, YAML sections, errors that name file and key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stepforge.serve.base import BackendConfig, load_backend_config
from stepforge.serve.errors import ConfigError


def test_experiment_style_yaml_section(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\nproposer:\n  backend:\n    kind: vllm\n    model: /m\n    tensor_parallel_size: 2\n")
    cfg = load_backend_config(path)
    assert (cfg.kind, cfg.model, cfg.tensor_parallel_size, cfg.enable_prefix_caching) == ("vllm", "/m", 2, True)
    assert cfg.actor_num_gpus() == 2.0
    top = tmp_path / "serve.yaml"
    top.write_text("backend:\n  kind: hf\n  model: /tiny\n  device: cpu\n")
    assert load_backend_config(top).actor_num_gpus() == 0.0
    assert load_backend_config(path, key="proposer.backend").model == "/m"


def test_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backend:\n  kind: hf\n  model: /m\n  temperature_typo: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: backend: temperature_typo: unknown key 'temperature_typo'; expected one of: kind"):
        load_backend_config(path)
    path.write_text("backend:\n  kind: gguf\n  model: /m\n")
    with pytest.raises(ConfigError, match=r"backend: kind: expected 'hf', 'vllm' or 'openai', got 'gguf'"):
        load_backend_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_backend_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no section 'serve.backend'"):
        load_backend_config(path, key="serve.backend")


def test_cross_field_rules():
    with pytest.raises(ValidationError, match="base_url"):
        BackendConfig(kind="openai", model="m")
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        BackendConfig(kind="hf", model="m", tensor_parallel_size=2)
    assert BackendConfig(kind="hf", model="m", device="cuda").actor_num_gpus() == 1.0
    assert BackendConfig(kind="openai", model="m", base_url="http://x/v1", api_key="k").resolved_api_key() == "k"


def test_vllm_lora_ranks_and_startup_timeout(tmp_path):
    assert BackendConfig(kind="vllm", model="m", max_lora_rank=1).max_lora_rank == 1  # vLLM allows rank 1
    path = tmp_path / "lora.yaml"
    path.write_text("backend:\n  kind: vllm\n  model: /m\n  max_lora_rank: 4\n")
    with pytest.raises(ConfigError, match=r"max_lora_rank: .*must be one of \[1, 8, 16"):
        load_backend_config(path)
    path.write_text("backend:\n  kind: vllm\n  model: /m\n  startup_timeout_s: 45\n  seed: 3\n")
    cfg = load_backend_config(path)
    assert (cfg.startup_timeout_s, cfg.seed) == (45.0, 3)
    assert BackendConfig(kind="vllm", model="m").startup_timeout_s == 600.0
    with pytest.raises(ValidationError, match="startup_timeout_s"):
        BackendConfig(kind="vllm", model="m", startup_timeout_s=0)
