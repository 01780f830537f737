"""Ray actors that host backends, and a pool that spreads batches over them.

`ModelPool` is itself a `ModelBackend`: `generate` blocks, while `submit` +
`collect` let the caller (the loop) verify one batch while the next one is
generating. A replica that dies mid-batch (crash, OOM, `ray.kill`) is
detected through `RayActorError`, replaced by a fresh actor, and its share of
the batch is re-run there, so the batch still completes in request order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stepforge.errors import ConfigError

from .base import BackendConfig, GenerationRequest, GenerationResult, ModelBackend, make_backend
from .errors import BackendUnavailableError, GenerationError, ModelNotFoundError, ServeError

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
LOCAL = "local"
# Ray's raylet kills a dead worker's whole process tree (a vLLM engine core included) only with this on;
# set for the local instances this module starts (a cluster started by `ray start` needs it in its own env).
SUBREAPER_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def driver_address(address: str | None = None) -> str | None:
    """The cluster a driver joins: `address`, else $RAY_ADDRESS; None for a private local instance.

    `local` (from either) forces a private instance. A dashboard URL
    (http://HEAD:8265) is the Jobs API's address, not a driver's: it is
    refused with the forms a driver takes (HEAD:6379, `auto`, ray://HEAD:10001).
    """
    source = "ray.address" if address else "$RAY_ADDRESS"
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address or address == LOCAL:
        return None
    if address.lower().startswith(("http://", "https://")):
        raise ConfigError(
            f"{source}={address} is the Ray dashboard (Jobs API) address, which `ray job submit` and "
            f"scripts/sweep.py take; a driver joins a cluster by its GCS address (HEAD:6379), `auto` "
            f"(the cluster `ray start` started on this machine) or ray://HEAD:10001 (Ray Client), "
            f"or `local` for a private instance")
    return address


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Join a Ray cluster, or start a private local one.

    The cluster is `driver_address(address)` (as under `ray job submit`, which
    sets $RAY_ADDRESS); joining passes no resources (those belong to the
    cluster). Otherwise a quiet private instance starts (never the one a
    `ray start` on this machine left in /tmp/ray) without the dashboard, with
    a small object store and `num_cpus` CPUs. A no-op if Ray is running.

    Ray's raylet-subreaper option (`SUBREAPER_ENV`) is never set: it makes the
    driver ignore SIGCHLD, so every child process of the driver (the verifier
    pool's workers, any subprocess) then reports exit status 0. Orphaned
    engines are reaped explicitly instead (`ModelPool` stops a dead replica's
    engine processes on its node before replacing it).
    """
    import ray

    if ray.is_initialized():
        return
    target = driver_address(address)
    if target:
        ray.init(address=target, logging_level=logging.WARNING)
        return
    ray.init(
        address=LOCAL,
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_memory or LOCAL_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


LOG_TAIL_CHARS = 4000
CLOSE_TIMEOUT_S = 30.0  # for a replica's engine to shut down before its actor is killed


def own_log_path() -> str | None:
    """The file this process's stderr goes to (a Ray worker's log), if it is a file."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def log_tail(path: str | None, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file, from a line start ('' if unreadable)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text[text.find("\n") + 1:] if len(text) >= chars and "\n" in text else text


def with_engine_log(exc: BaseException, path: str | None) -> BaseException:
    """An engine load failure that names its own log: the tail of the actor's log (where the
    engine's subprocesses wrote the root cause) is appended, the error type kept."""
    tail = log_tail(path).strip()
    if not tail or isinstance(exc, (ModelNotFoundError, ConfigError)):
        return exc
    message = f"{type(exc).__name__}: {exc}\n--- the model actor's log ({path}), last lines ---\n{tail}"
    return (type(exc) if isinstance(exc, ServeError) else BackendUnavailableError)(message)


def descendants() -> list[tuple[int, float]]:
    """(pid, create time) of every process below this one (an engine's workers)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            out.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return out


def reap(processes: list[tuple[int, float]], timeout_s: float = 30.0) -> int:
    """Kill the listed processes that still run (matched by pid and create time, so a reused
    pid is left alone) and wait until they are gone; returns how many were killed."""
    import psutil

    alive = []
    for pid, created in processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3:
                alive.append(proc)
        except psutil.Error:
            continue
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=timeout_s)
    if still:
        raise BackendUnavailableError(f"engine processes {[p.pid for p in still]} of a dead replica did not exit "
                                      f"within {timeout_s:g}s; their GPU is not free")
    return len(alive)


class ModelActor:
    """Owns one backend instance inside a Ray worker process.

    Construction errors are kept and re-raised by `ready()`, so the caller
    sees the typed error (e.g. ModelNotFoundError) instead of a dead actor;
    an engine's own failure carries the tail of the actor's log.
    """

    def __init__(self, config: dict[str, Any]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.error: BaseException | None = None
        self.backend: ModelBackend | None = None
        try:
            self.backend = make_backend(BackendConfig.model_validate(config))
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            self.error = with_engine_log(exc, own_log_path())

    def ready(self) -> dict[str, Any]:
        """Where the loaded backend lives: pid, Ray node id and the engine's processes
        (what `reap` stops should this replica die); raises its load error."""
        if self.error is not None:
            raise self.error
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "processes": descendants()}

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run the backend on a shard of a batch."""
        return self.backend.generate(requests)

    def count_tokens(self, text: str) -> int:
        """Count tokens with the hosted backend."""
        return self.backend.count_tokens(text)

    def count_prompts(self, requests: list[GenerationRequest]) -> list[int]:
        """Prompt tokens of each request under the hosted backend."""
        return self.backend.count_prompts(requests)

    def context_length(self) -> int | None:
        """The hosted model's context window."""
        return self.backend.context_length()

    def close(self) -> None:
        """Release the hosted backend."""
        if self.backend is not None:
            self.backend.close()


def actor_placement(config: BackendConfig, cluster_gpus: float) -> tuple[BackendConfig, float]:
    """The config a replica runs and the GPUs it reserves.

    An hf backend on `device: auto` reserves one GPU when the cluster has
    one (and runs on it), else runs on the CPU; an hf replica that reserves
    no GPU is pinned to the CPU, so it never takes a GPU another replica holds.
    """
    gpus = config.actor_num_gpus()
    if config.kind == "hf" and config.device == "auto" and config.num_gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if config.kind == "hf" and config.device == "auto":
        config = config.model_copy(update={"device": "cuda" if gpus > 0 else "cpu"})
    return config, gpus


_REMOTE_ACTOR = None


def remote_actor_class():
    """`ModelActor` as a Ray actor class (created on first use; no Ray-level
    restarts, since the pool replaces dead replicas itself)."""
    global _REMOTE_ACTOR
    if _REMOTE_ACTOR is None:
        import ray

        _REMOTE_ACTOR = ray.remote(max_restarts=0, max_task_retries=0)(ModelActor)
    return _REMOTE_ACTOR


def split_balanced(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty [start, end) ranges with near-equal weight sums."""
    if not weights:
        return []
    parts = max(1, min(parts, len(weights)))
    total = sum(weights)
    bounds, acc, start = [], 0, 0
    for i, w in enumerate(weights):
        acc += w
        remaining_items = len(weights) - (i + 1)
        remaining_parts = parts - len(bounds) - 1
        if remaining_parts > 0 and (acc >= total * (len(bounds) + 1) / parts or remaining_items == remaining_parts):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(weights)))
    return bounds


@dataclass
class Shard:
    """A contiguous slice of a submitted batch, assigned to one replica slot."""

    start: int
    requests: list[GenerationRequest]
    slot: int
    actor: Any
    ref: Any
    attempts: int = 1


@dataclass
class PendingBatch:
    """A submitted batch. `refs` are Ray ObjectRefs (usable with `ray.wait`);
    pass the batch to `ModelPool.collect` for the results."""

    size: int
    shards: list[Shard] = field(default_factory=list)

    @property
    def refs(self) -> list[Any]:
        """The in-flight ObjectRefs, one per shard."""
        return [s.ref for s in self.shards]

    def done(self) -> bool:
        """True when every shard has finished (successfully or not)."""
        import ray

        if not self.shards:
            return True
        ready, _ = ray.wait(self.refs, num_returns=len(self.shards), timeout=0)
        return len(ready) == len(self.shards)


class ModelPool(ModelBackend):
    """`replicas` Ray actors, each hosting a backend built from `config`.

    Each actor reserves 1 CPU and the GPUs of `actor_placement` (the vLLM
    tensor-parallel size; one for an hf backend on a GPU); `actor_options`
    overrides any Ray actor option.
    Replicas that are not placed and loaded within `startup_timeout_s`
    (default: the config's `startup_timeout_s`) raise BackendUnavailableError
    instead of waiting forever. A replica that dies is replaced only after
    its engine's processes (recorded when it loaded) are stopped on its node,
    so the new engine never starts on a GPU an orphaned one still holds.
    """

    def __init__(
        self,
        config: BackendConfig,
        replicas: int = 1,
        *,
        address: str | None = None,
        actor_options: dict[str, Any] | None = None,
        max_attempts: int = 3,
        startup_timeout_s: float | None = None,
    ):
        import ray

        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        init_ray(address)
        self.config, gpus = actor_placement(config, ray.cluster_resources().get("GPU", 0.0))
        self.max_attempts = max_attempts
        self.startup_timeout_s = config.startup_timeout_s if startup_timeout_s is None else startup_timeout_s
        self.actor_options = {"num_cpus": 1, "num_gpus": gpus, **(actor_options or {})}
        self.replacements = 0
        self.reaped = 0  # engine processes of dead replicas stopped before their replacement started
        self._lock = threading.Lock()
        self._next_slot = 0
        self._where: dict[Any, dict[str, Any]] = {}  # actor -> what its ready() reported
        self.actors = [self._spawn() for _ in range(replicas)]
        self._wait_ready(self.actors)

    # -- replicas -----------------------------------------------------------
    def _spawn(self):
        return remote_actor_class().options(**self.actor_options).remote(self.config.model_dump())

    def _wait_ready(self, actors: list[Any]) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            infos = ray.get([a.ready.remote() for a in actors], timeout=self.startup_timeout_s)
        except RayTaskError as exc:
            for a in actors:
                ray.kill(a)
            raise _cause(exc) from None
        except GetTimeoutError:
            for a in actors:
                ray.kill(a)
            raise BackendUnavailableError(
                f"model actor(s) not ready after {self.startup_timeout_s:.0f}s; does the cluster have free "
                f"resources for {self.actor_options} per replica? (cluster: {ray.cluster_resources()})"
            ) from None
        except RayActorError as exc:
            for a in actors:
                ray.kill(a)
            raise BackendUnavailableError(f"model actor failed to start: {exc}") from None
        self._where.update(zip(actors, infos))

    def _reap_engine(self, dead: Any) -> None:
        """Stop the dead replica's engine processes on its node (a task pinned there) and wait for them."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        info = self._where.pop(dead, None)
        if not info or not info["processes"]:
            return
        strategy = NodeAffinitySchedulingStrategy(info["node_id"], soft=False)
        task = ray.remote(num_cpus=0, max_retries=0)(reap).options(scheduling_strategy=strategy)
        self.reaped += ray.get(task.remote(info["processes"]))

    def _replace(self, slot: int, dead: Any) -> Any:
        """Swap a dead replica for a fresh one (once, even if several shards saw it die)."""
        import ray

        with self._lock:
            if self.actors[slot] is not dead:
                return self.actors[slot]
            try:
                ray.kill(dead, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._reap_engine(dead)
            fresh = self._spawn()
            self._wait_ready([fresh])
            self.actors[slot] = fresh
            self.replacements += 1
            return fresh

    # -- batches ------------------------------------------------------------
    def submit(self, requests: list[GenerationRequest]) -> PendingBatch:
        """Spread `requests` over the replicas (contiguous shards balanced by
        n) without waiting; returns a handle for `collect`."""
        pending = PendingBatch(size=len(requests))
        ranges = split_balanced([r.sampling.n for r in requests], len(self.actors))
        with self._lock:
            first, self._next_slot = self._next_slot, (self._next_slot + len(ranges)) % len(self.actors)
            actors = list(self.actors)
        for j, (start, end) in enumerate(ranges):
            slot = (first + j) % len(actors)
            shard_requests = list(requests[start:end])
            ref = actors[slot].generate.remote(shard_requests)
            pending.shards.append(Shard(start, shard_requests, slot, actors[slot], ref))
        return pending

    def collect(self, pending: PendingBatch, timeout_s: float | None = None) -> list[GenerationResult]:
        """Wait for a submitted batch; results come back in request order.

        Shards of replicas that died are re-run on replacements (at most
        `max_attempts` runs per shard). Backend errors are re-raised as their
        own typed `ServeError`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: list[GenerationResult | None] = [None] * pending.size
        for shard in pending.shards:
            out = self._resolve(shard, deadline)
            results[shard.start : shard.start + len(out)] = out
        return results  # type: ignore[return-value]

    def _resolve(self, shard: Shard, deadline: float | None) -> list[GenerationResult]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return ray.get(shard.ref, timeout=remaining)
            except RayActorError as exc:
                if shard.attempts >= self.max_attempts:
                    raise GenerationError(f"shard failed {shard.attempts} times, replicas keep dying: {exc}") from None
                actor = self._replace(shard.slot, shard.actor)
                shard.actor, shard.attempts = actor, shard.attempts + 1
                shard.ref = actor.generate.remote(shard.requests)
            except RayTaskError as exc:
                raise _cause(exc) from None
            except GetTimeoutError:
                raise GenerationError("timed out waiting for the model pool") from None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Blocking: submit and collect."""
        return self.collect(self.submit(requests))

    def count_tokens(self, text: str) -> int:
        """Count tokens on the first replica (replacing it if it died)."""
        return self._ask_first("count_tokens", text)

    def count_prompts(self, requests: list[GenerationRequest]) -> list[int]:
        """Prompt tokens of each request, counted in one call on the first replica."""
        return self._ask_first("count_prompts", requests) if requests else []

    def context_length(self) -> int | None:
        """The served model's context window (asked once)."""
        if not hasattr(self, "_context"):
            self._context = self._ask_first("context_length")
        return self._context

    def _ask_first(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError

        actor = self.actors[0]
        try:
            return ray.get(getattr(actor, method).remote(*args))
        except RayActorError:
            return ray.get(getattr(self._replace(0, actor), method).remote(*args))

    def close(self) -> None:
        """Stop every replica: its engine shut down (or its processes reaped), then the actor
        (the Ray cluster itself keeps running)."""
        import ray

        try:
            ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - dead replicas are reaped below
            pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            try:
                self._reap_engine(actor)
            except Exception:  # noqa: BLE001 - closing: the node may be gone too
                pass
        self.actors = []


def _cause(exc: Any) -> BaseException:
    """The original exception inside a RayTaskError, typed errors preserved."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ServeError):
        return cause
    if isinstance(cause, BaseException):
        return GenerationError(f"model actor failed: {type(cause).__name__}: {cause}")
    return GenerationError(f"model actor failed: {exc}")
