"""Shared fixtures of the serve tests: the tiny model, built once per session.

Imported by the `test_serve_*` modules (`from serve_fixtures import ...`).
Builds are cached by path, so importing the fixtures into several modules
still builds the model and loads the backend only once.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_BACKENDS: dict[str, object] = {}

STEPFORGE = str(Path(sys.executable).parent / "stepforge")
STAND_INS = Path(__file__).resolve().parent / "stand_ins"


def stand_in_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess that imports the stand-in `vllm`."""
    path = os.pathsep.join(p for p in (str(STAND_INS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path, **extra}


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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs a uvicorn server for an ASGI app on a loopback port in a thread."""

    def __init__(self, app, port: int | None = None):
        import threading

        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)



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
