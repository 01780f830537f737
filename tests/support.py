"""Test helpers that are not fixtures: the installed CLI, free loopback ports, a server thread."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

STEPFORGE = str(Path(sys.executable).parent / "stepforge")


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


# The 8 groups of the published 26-task benchmark (docs/benchmark.md); every other group holds added tasks.
PUBLISHED_GROUPS = ("attention", "bmm", "gemm", "norm", "rope", "moe-index", "moe-expert", "moe-end-to-end")


def added_task_keys(tasks) -> list[str]:
    """The keys of the tasks outside the published benchmark's groups, in benchmark order."""
    return [key for key, task in tasks.items() if task.group not in PUBLISHED_GROUPS]
