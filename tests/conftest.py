"""Fixtures shared by the whole suite: the tiny model (built once per session), its backend, a local Ray.

Helpers that are not fixtures live in `support.py` and `program_gen.py` beside this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never join a cluster running on this machine (a `ray start --head`, or the stale current-cluster file of
# one that was killed): every driver the suite starts, in process or through the CLI, gets a private instance.
os.environ["RAY_ADDRESS"] = "local"

STAND_INS = Path(__file__).resolve().parent / "stand_ins"

_BACKENDS: dict[str, object] = {}

def _drop_vllm_modules() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def stand_in_vllm():
    """The stand-in `vllm` package (tests/stand_ins), importable for one test
    module only: sys.path and sys.modules are restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        _drop_vllm_modules()
        mp.syspath_prepend(str(STAND_INS))
        import vllm

        assert vllm.__file__.startswith(str(STAND_INS)), vllm.__file__
        yield vllm
        _drop_vllm_modules()


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
    """A private local 2-CPU Ray instance for one test module (never a cluster already on the machine)."""
    import ray

    from stepforge.serve.actors import init_ray

    init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()
