"""Where the ablation's SFT runs: a Ray task that reserves a GPU when the cluster has one, else the driver."""

from __future__ import annotations

from typing import Any, Optional


def sft_task_options(cluster_gpus: float) -> Optional[dict[str, Any]]:
    """Ray options of the SFT training task: one GPU when the cluster has one (the driver reserves
    none), the worker exiting afterwards so the GPU is free before the arms' model actors start.
    None: no GPU anywhere, train in this process."""
    if cluster_gpus < 1:
        return None
    return {"num_cpus": 1, "num_gpus": 1, "max_calls": 1, "max_retries": 0}


def _cluster_gpus() -> float:
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def _train_sft_task(kwargs: dict[str, Any]) -> str:
    """`run_sft` inside a Ray worker that reserves a GPU; the adapter folder."""
    from .pipeline import run_sft

    return str(run_sft(**kwargs).out)
