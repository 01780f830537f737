"""Test controls of the stand-in engine (not part of vLLM's interface)."""

from __future__ import annotations

import json
import os

FINISH_ENV = "STAND_IN_VLLM_FINISH"


def forced_finish(request_index: int, sample_index: int) -> str | None:
    """The finish reason a test chose for this sample, from $STAND_IN_VLLM_FINISH
    (keys "<request>" or "<request>/<sample>", the latter winning)."""
    raw = os.environ.get(FINISH_ENV)
    if not raw:
        return None
    table = json.loads(raw)
    if not isinstance(table, dict):
        raise ValueError(f"${FINISH_ENV} must be a JSON object, got {raw!r}")
    return table.get(f"{request_index}/{sample_index}", table.get(str(request_index)))
