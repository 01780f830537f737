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

from .base import BackendConfig, GenerationRequest, GenerationResult, ModelBackend, make_backend
from .errors import BackendUnavailableError, GenerationError, ServeError

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to a Ray cluster, or start a small local one.

    An explicit `address`, else $RAY_ADDRESS, names an existing cluster (as
    under `ray job submit`). Otherwise a quiet local instance starts without
    the dashboard and with a small object store. A no-op if Ray is running.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_memory or LOCAL_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


class ModelActor:
    """Owns one backend instance inside a Ray worker process.

    Construction errors are kept and re-raised by `ready()`, so the caller
    sees the typed error (e.g. ModelNotFoundError) instead of a dead actor.
    """

    def __init__(self, config: dict[str, Any]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.error: BaseException | None = None
        self.backend: ModelBackend | None = None
        try:
            self.backend = make_backend(BackendConfig.model_validate(config))
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            self.error = exc

    def ready(self) -> int:
        """The worker's pid once the backend is loaded; raises its load error."""
        if self.error is not None:
            raise self.error
        return os.getpid()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run the backend on a shard of a batch."""
        return self.backend.generate(requests)

    def count_tokens(self, text: str) -> int:
        """Count tokens with the hosted backend."""
        return self.backend.count_tokens(text)

    def close(self) -> None:
        """Release the hosted backend."""
        if self.backend is not None:
            self.backend.close()


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

    Each actor reserves 1 CPU and `config.actor_num_gpus()` GPUs (the vLLM
    tensor-parallel size); `actor_options` overrides any Ray actor option.
    Replicas that are not placed and loaded within `startup_timeout_s`
    (default: the config's `startup_timeout_s`) raise BackendUnavailableError
    instead of waiting forever.
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
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        init_ray(address)
        self.config = config
        self.max_attempts = max_attempts
        self.startup_timeout_s = config.startup_timeout_s if startup_timeout_s is None else startup_timeout_s
        self.actor_options = {"num_cpus": 1, "num_gpus": config.actor_num_gpus(), **(actor_options or {})}
        self.replacements = 0
        self._lock = threading.Lock()
        self._next_slot = 0
        self.actors = [self._spawn() for _ in range(replicas)]
        self._wait_ready(self.actors)

    # -- replicas -----------------------------------------------------------
    def _spawn(self):
        return remote_actor_class().options(**self.actor_options).remote(self.config.model_dump())

    def _wait_ready(self, actors: list[Any]) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            ray.get([a.ready.remote() for a in actors], timeout=self.startup_timeout_s)
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
        import ray
        from ray.exceptions import RayActorError

        actor = self.actors[0]
        try:
            return ray.get(actor.count_tokens.remote(text))
        except RayActorError:
            return ray.get(self._replace(0, actor).count_tokens.remote(text))

    def close(self) -> None:
        """Stop every replica (the Ray cluster itself keeps running)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
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
