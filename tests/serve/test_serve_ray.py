"""A pool of model actors on a small local Ray cluster, serving the tiny model."""

from __future__ import annotations

import os
import time

import pytest

from stepforge.serve.actors import ModelPool, split_balanced
from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams
from stepforge.serve.errors import BackendUnavailableError, ModelNotFoundError, PromptTooLongError

pytestmark = pytest.mark.slow  # end to end: real Ray, training or process kills


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_dir):
    p = ModelPool(BackendConfig(kind="hf", model=str(tiny_model_dir), device="cpu"), replicas=2)
    yield p
    p.close()


def batch(count: int, n: int, max_tokens: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt="E1 = step." + " Map" * i, request_id=f"r{i}", sampling=SamplingParams(n=n, max_tokens=max_tokens, seed=i))
        for i in range(count)
    ]


def test_split_balanced_covers_everything_in_order():
    assert split_balanced([1] * 5, 2) == [(0, 3), (3, 5)]
    assert split_balanced([4, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert split_balanced([1, 1], 4) == [(0, 1), (1, 2)]
    assert split_balanced([], 3) == []


def test_pool_spreads_a_batch_and_keeps_order(pool, hf_backend, ray_local, long_prompt):
    reqs = batch(6, n=2, max_tokens=8)
    pending = pool.submit(reqs)
    assert len(pending.refs) == 2 and {s.slot for s in pending.shards} == {0, 1}
    results = pool.collect(pending)
    assert pending.done()
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    local = hf_backend.generate(reqs)
    assert [r.prompt_tokens for r in results] == [r.prompt_tokens for r in local]
    assert [r.texts for r in results] == [r.texts for r in local]
    infos = ray_local.get([a.ready.remote() for a in pool.actors])
    pids = [info["pid"] for info in infos]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert all(info["node_id"] == ray_local.get_runtime_context().get_node_id() for info in infos)
    assert pool.actor_options["num_gpus"] == 0 and pool.config.device == "cpu"  # no GPU here: none reserved
    assert pool.count_tokens("E1 = step.Map") == hf_backend.count_tokens("E1 = step.Map")
    with pytest.raises(PromptTooLongError):  # the actor's typed error reaches the caller as itself
        pool.generate([GenerationRequest(prompt=long_prompt)])


def test_killed_actor_is_replaced_and_batch_completes(pool, ray_local):
    reqs = batch(8, n=4, max_tokens=256)  # each shard takes ~1-3 s, the kill lands well inside it
    replaced_before = pool.replacements
    pending = pool.submit(reqs)
    victim_shard = pending.shards[0]
    victim = victim_shard.actor
    time.sleep(0.1)  # let the shard start generating, then kill its replica mid-way
    ray_local.kill(victim)
    results = pool.collect(pending)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    assert all(len(r.completions) == 4 for r in results)
    assert pool.replacements == replaced_before + 1
    assert victim_shard.attempts == 2 and pool.actors[victim_shard.slot] is not victim
    assert victim not in pool._where and pool.actors[victim_shard.slot] in pool._where  # reaped, then recorded
    again = pool.generate(reqs[:2])  # the replacement serves, and seeds still reproduce
    assert [r.texts for r in again] == [r.texts for r in results[:2]]


def test_pool_surfaces_typed_load_errors(ray_local, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ModelPool(BackendConfig(kind="hf", model=str(tmp_path / "missing")), replicas=1, actor_options={"num_cpus": 0})


def test_unplaceable_pool_fails_instead_of_hanging(ray_local, tiny_model_dir):
    config = BackendConfig(kind="hf", model=str(tiny_model_dir), num_gpus=1, startup_timeout_s=2)  # this cluster has no GPU
    with pytest.raises(BackendUnavailableError, match="not ready after 2s"):
        ModelPool(config, replicas=1)  # the timeout comes from the config


def test_an_engine_error_in_an_actor_reaches_the_driver_with_its_log(ray_local):
    """What a failed engine wrote to stderr in its actor (vLLM's engine core writes the root cause
    there) is in the actor's log file, which `with_engine_log` quotes in the driver's error."""
    from stepforge.serve.actors import log_tail, own_log_path, with_engine_log

    @ray_local.remote(num_cpus=0)
    def fail_like_an_engine():
        import sys

        print("RuntimeError: the engine core ran out of GPU memory", file=sys.stderr, flush=True)
        return str(with_engine_log(RuntimeError("Engine core initialization failed. See root cause above."),
                                   own_log_path())), log_tail(own_log_path())

    message, tail = ray_local.get(fail_like_an_engine.remote())
    assert "ran out of GPU memory" in tail
    assert message.startswith("RuntimeError: Engine core initialization failed") and "ran out of GPU memory" in message


def test_child_exit_codes_survive_a_private_ray(ray_local):
    """A private Ray must not make the driver ignore SIGCHLD (Ray's subreaper option does): children's
    exit codes (the verifier pool's workers, CLI subprocesses) must stay visible."""
    import subprocess
    import sys

    assert ray_local.is_initialized()
    assert subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"]).returncode == 3
