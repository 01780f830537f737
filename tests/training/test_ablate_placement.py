"""Where `stepforge ablate` trains its adapter: on a GPU the cluster reserves for it when there is one
(a Ray task, before any evaluation arm starts), in this process on a machine without GPUs."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from stepforge.training import ablate

REPO = Path(__file__).resolve().parents[2]


class FakeRay:
    """A Ray with `gpus` GPUs whose tasks run inline, recording the options they were given."""

    def __init__(self, gpus: float):
        self.gpus, self.options, self.inside_task = gpus, [], False

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 4.0, "GPU": self.gpus} if self.gpus else {"CPU": 4.0}

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **opts):
                fake.options.append(opts)
                return self

            def remote(self, *args):
                fake.inside_task = True
                try:
                    return fn(*args)
                finally:
                    fake.inside_task = False

        return Task()

    def get(self, value):
        return value


def test_sft_task_options():
    assert ablate.sft_task_options(0) is None and ablate.sft_task_options(0.5) is None
    opts = ablate.sft_task_options(2)
    assert opts["num_gpus"] == 1 and opts["max_calls"] == 1  # the worker exits: its GPU is free for the arms


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_adapter_is_trained_where_a_gpu_is_reserved(monkeypatch, tmp_path, gpus):
    fake = FakeRay(gpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    calls = []

    def run_sft(**kwargs):
        calls.append((fake.inside_task, kwargs))
        return SimpleNamespace(out=Path(kwargs["out"]))

    monkeypatch.setattr("stepforge.training.pipeline.run_sft", run_sft)
    cfg = ablate.load_ablation_config(REPO / "configs" / "ablate_tiny.yaml")
    split = {"train": ["moe-index/G_0_3_04"], "test": ["rope/G_0_3_02"]}
    out = ablate.ensure_adapter(cfg, tmp_path, split, ablate.base_improve_dict(cfg), lambda msg: None)
    assert out == tmp_path / "sft"
    ((in_task, kwargs),) = calls
    assert kwargs["only_tasks"] == split["train"]
    if gpus:
        assert in_task and fake.options == [ablate.sft_task_options(gpus)]
    else:
        assert not in_task and fake.options == []
