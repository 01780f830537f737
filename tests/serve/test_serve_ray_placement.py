"""How the serving layer meets Ray, without starting it: the address a driver joins, the resources a
replica reserves, the engine log a failed load carries, and the reaping of a dead replica's engine."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from stepforge.errors import ConfigError
from stepforge.serve import actors
from stepforge.serve.base import BackendConfig
from stepforge.serve.errors import BackendUnavailableError, GenerationError, ModelNotFoundError


class FakeRay:
    """Records what `init_ray` passes to `ray.init`."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(actors.SUBREAPER_ENV, raising=False)
    return fake


def test_joining_a_cluster_passes_no_resources(fake_ray, monkeypatch):
    actors.init_ray("10.0.0.1:6379", num_cpus=4)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    actors.init_ray(None, num_cpus=4)
    assert [c["address"] for c in fake_ray.calls] == ["10.0.0.1:6379", "auto"]
    for call in fake_ray.calls:
        assert not {"num_cpus", "num_gpus", "object_store_memory", "include_dashboard"} & set(call)


@pytest.mark.parametrize("address, env", [(None, None), ("local", None), (None, "local"), ("local", "10.0.0.1:6379")])
def test_no_address_or_local_starts_a_private_instance(fake_ray, monkeypatch, address, env):
    import os

    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    actors.init_ray(address, num_cpus=3)
    (call,) = fake_ray.calls
    # address="local" makes Ray start a new instance, never the one /tmp/ray/ray_current_cluster names
    assert call["address"] == "local" and call["num_cpus"] == 3 and call["include_dashboard"] is False
    assert actors.SUBREAPER_ENV not in os.environ  # it would make the driver ignore SIGCHLD (see init_ray)


@pytest.mark.parametrize("address", ["http://head:8265", "https://head:8265"])
def test_a_dashboard_url_given_to_a_driver_names_the_right_forms(fake_ray, monkeypatch, address):
    with pytest.raises(ConfigError, match=r"ray.address=http.*Jobs API.*HEAD:6379.*auto"):
        actors.init_ray(address)
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=r"\$RAY_ADDRESS=http.*ray job submit"):
        actors.init_ray(None)
    assert fake_ray.calls == []


def test_the_improve_job_shows_the_address_error_as_a_config_error(fake_ray, monkeypatch):
    from stepforge.loop.config import ImproveConfig
    from stepforge.loop.job import start_ray

    cfg = ImproveConfig.model_validate({"ray": {"address": "http://head:8265"}})
    with pytest.raises(ConfigError, match="dashboard"):
        start_ray(cfg)


def test_hf_replicas_reserve_the_gpu_they_use():
    hf = BackendConfig(kind="hf", model="/m")  # device auto
    config, gpus = actors.actor_placement(hf, cluster_gpus=2)
    assert gpus == 1 and config.device == "cuda"
    config, gpus = actors.actor_placement(hf, cluster_gpus=0)
    assert gpus == 0 and config.device == "cpu"  # no GPU reserved: never touches one
    config, gpus = actors.actor_placement(hf.model_copy(update={"num_gpus": 0.0}), cluster_gpus=2)
    assert gpus == 0 and config.device == "cpu"
    config, gpus = actors.actor_placement(BackendConfig(kind="hf", model="/m", device="cpu"), cluster_gpus=2)
    assert gpus == 0 and config.device == "cpu"
    vllm = BackendConfig(kind="vllm", model="/m", tensor_parallel_size=2)
    assert actors.actor_placement(vllm, cluster_gpus=8) == (vllm, 2.0)


def test_num_gpus_below_the_tensor_parallel_size_is_a_config_error():
    with pytest.raises(ValueError, match="num_gpus 1 is below tensor_parallel_size 2"):
        BackendConfig(kind="vllm", model="/m", tensor_parallel_size=2, num_gpus=1)
    with pytest.raises(ValueError, match="below tensor_parallel_size 1"):
        BackendConfig(kind="vllm", model="/m", num_gpus=0)
    with pytest.raises(ValueError, match="does not reserve"):
        BackendConfig(kind="hf", model="/m", device="cuda", num_gpus=0)
    assert BackendConfig(kind="vllm", model="/m", tensor_parallel_size=2, num_gpus=2).actor_num_gpus() == 2
    assert BackendConfig(kind="vllm", model="/m", num_gpus=0.5).actor_num_gpus() == 0.5  # one GPU shared


def test_a_failed_engine_load_carries_the_actor_log(tmp_path):
    log = tmp_path / "worker.err"
    log.write_text("noise\n" * 2000 + "RuntimeError: CUDA out of memory while loading weights\n")
    err = actors.with_engine_log(RuntimeError("Engine core initialization failed. See root cause above."), str(log))
    assert isinstance(err, BackendUnavailableError)
    text = str(err)
    assert text.startswith("RuntimeError: Engine core initialization failed")
    assert str(log) in text and text.rstrip().endswith("CUDA out of memory while loading weights")
    assert len(text) < actors.LOG_TAIL_CHARS + 500
    typed = actors.with_engine_log(GenerationError("boom"), str(log))
    assert isinstance(typed, GenerationError) and "CUDA out of memory" in str(typed)
    missing = ModelNotFoundError("/m does not exist")
    assert actors.with_engine_log(missing, str(log)) is missing  # its own message says it all
    plain = RuntimeError("x")
    assert actors.with_engine_log(plain, None) is plain and actors.with_engine_log(plain, str(tmp_path / "no")) is plain


def test_own_log_path_is_the_file_stderr_goes_to(tmp_path):
    log = tmp_path / "err.log"
    code = "from stepforge.serve.actors import own_log_path; import sys; print(own_log_path())"
    with open(log, "w") as fh:
        out = subprocess.run([sys.executable, "-c", code], stderr=fh, stdout=subprocess.PIPE, text=True, check=True)
    assert out.stdout.strip() == str(log)


def test_reap_stops_an_orphaned_engine_and_spares_a_reused_pid():
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        proc = psutil.Process(engine.pid)
        assert actors.reap([(engine.pid, proc.create_time() + 5.0)]) == 0  # not the process recorded
        assert engine.poll() is None
        t0 = time.monotonic()
        assert actors.reap([(engine.pid, proc.create_time())]) == 1
        assert engine.wait(timeout=10) is not None and time.monotonic() - t0 < 10
        assert actors.reap([(engine.pid, proc.create_time())]) == 0  # already gone
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_descendants_lists_the_engine_processes():
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pids = [pid for pid, _ in actors.descendants()]
        assert engine.pid in pids
    finally:
        engine.kill()
        engine.wait()
