"""Fixtures of the loop tests: one small search run shared by the library and report tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepforge.loop.runstore import load_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEARCH_RUN_TASKS = ["bmm/bmm_0", "rope/G_0_3_02", "moe-index/G_0_3_03"]


@pytest.fixture(scope="session")
def search_run(tmp_path_factory) -> Path:
    """A finished improve run of the search proposer on three tasks (one round, one sample each)."""
    from stepforge.loop.job import run_improve

    run = tmp_path_factory.mktemp("search-run") / "run"
    run_improve(CONFIGS / "default.yaml", run_dir=run, progress=False,
                overrides=[f"tasks=[{', '.join(SEARCH_RUN_TASKS)}]", "max_rounds=1", "n=1", "temperatures=[0.4]",
                           "verifier.workers=1"])
    assert load_jsonl(run / "buffer.jsonl"), "the search solved nothing"
    return run
