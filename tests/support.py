"""Test helpers that are not fixtures: the installed CLI, free loopback ports, a server thread."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

STEPFORGE = str(Path(sys.executable).parent / "stepforge")
STAND_INS = Path(__file__).resolve().parent / "stand_ins"


def stand_in_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess that imports the stand-in `vllm` (tests/stand_ins)."""
    path = os.pathsep.join(p for p in (str(STAND_INS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path, **extra}


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


_MINIMAL_TASK = """\
test_name: {name}
inputs:
  - {{name: E0, dtype: fp32, dims: [D, N], data_gen: torch.rand}}
fns:
  - name: add
    func_name: fn_add
    input_dtype: fp32
    output_dtype: fp32
    init: 0
    apply: |
      return [state[0] + input[0]]
outputs:
  - name: S0
    dtype: fp32
    dims: [N]
    data_transform: |
      input_data['E0'].sum(dim=-1)
impl: |
  S0 = step.Accum(fn=fn_add, b=1).apply(E0)
  return S0
"""


def make_task(name: str):
    """A small valid task named `name` (row sums), for tests whose proposers never read the task."""
    from stepforge.benchmark.schema import Task

    return Task.from_yaml(_MINIMAL_TASK.format(name=name))


def edited_run_copy(run, dest, impls: dict, name: str, **config):
    """A copy of a run directory with some earned programs replaced (task key -> impl) and config keys set."""
    import json
    import shutil

    import yaml

    from stepforge.loop.runstore import load_jsonl

    shutil.copytree(run, dest)
    entries = load_jsonl(dest / "buffer.jsonl")
    for e in entries:
        e["impl"] = impls.get(e["task_key"], e["impl"])
    (dest / "buffer.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg.update(name=name, **config)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# The 8 groups of the published 26-task benchmark (docs/benchmark.md); every other group holds added tasks.
PUBLISHED_GROUPS = ("attention", "bmm", "gemm", "norm", "rope", "moe-index", "moe-expert", "moe-end-to-end")


def added_task_keys(tasks) -> list[str]:
    """The keys of the tasks outside the published benchmark's groups, in benchmark order."""
    return [key for key, task in tasks.items() if task.group not in PUBLISHED_GROUPS]


# A rope/G_0_3_02 program whose Repeat makes 35 * 2**25 elements: a resource error before anything is allocated.
BLOW_UP = """\
big = step.Repeat(n=33554432).apply(E0)
ones = step.Accum(fn=fn_position, b=1).apply(big)
positions = step.Scan(fn=fn_position, b=1).apply(ones)
pairs = step.Zip().apply((positions, E1))
S0 = step.Map(fn=fn_rotate).apply(pairs)
return S0
"""
