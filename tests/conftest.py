"""Fixtures shared by the whole suite: the tiny model (built once per session), its backend, a local Ray.

Helpers that are not fixtures live in `support.py` and `program_gen.py` beside this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_BACKENDS: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint directory (built once per session)."""
    from stepforge.serve.tiny_model import build_tiny_model

    out = tmp_path_factory.getbasetemp() / "tiny_model"
    if not (out / "config.json").exists():
        build_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def hf_backend(tiny_model_dir):
    """One transformers backend on the tiny model, shared by the session."""
    from stepforge.serve.base import BackendConfig, make_backend

    key = str(tiny_model_dir)
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(BackendConfig(kind="hf", model=key, device="cpu"))
    return _BACKENDS[key]


@pytest.fixture(scope="session")
def long_prompt(tiny_model_dir) -> str:
    """A prompt longer than the tiny model's context, whatever its vocabulary:
    Qwen2's pre-tokenizer makes every digit (and the space between) a token."""
    import json

    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    return " ".join(["7"] * (context + 1))


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for one test module (an outer RAY_ADDRESS is set aside meanwhile)."""
    import ray

    from stepforge.serve.actors import init_ray

    saved = os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved
