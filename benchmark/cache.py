"""A least-recently-used cache of per-task entries, bounded by entries and by bytes.

The verifier keeps, per task, everything a candidate cannot influence (types,
compiled oracles, fns, inputs, parameters, oracle outputs and tolerances).
Entries are keyed by the task's content fingerprint, so a task whose file
changed is a different key (its old entry is never served, and ages out);
they grow while a task's bindings and seeds are computed, and the owner
reports each addition with `grew`. When the entries together exceed
`max_bytes`, or there are more than `max_entries`, the least recently used
entries are dropped. The entry in use is never dropped, even when it alone
is over the byte bound (it is dropped as soon as another is used).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

import torch

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 512 * 2**20

V = TypeVar("V")


def tensor_bytes(values: Iterable[Any]) -> int:
    """The storage bytes of the tensors in `values` (tensors, lists of tensors; other items count 0)."""
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += tensor_bytes(v)
    return total


class BoundedLRU(Generic[V]):
    """key -> entry, least recently used first out; see the module docstring."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_entries < 1 or max_bytes < 0:
            raise ValueError("max_entries must be >= 1 and max_bytes >= 0")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[Hashable, V]" = OrderedDict()
        self._bytes: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry for `key` (made with `make()` on a miss), now the most recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = make()
        self._entries[key] = entry
        self._bytes[key] = 0
        self._evict()
        return entry

    def grew(self, key: Hashable, nbytes: int) -> None:
        """Account `nbytes` more held by the entry of `key`, then evict down to the bounds."""
        if key in self._bytes:
            self._bytes[key] += int(nbytes)
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            old, _ = self._entries.popitem(last=False)
            del self._bytes[old]
            self.evictions += 1

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._bytes.clear()

    def stats(self) -> dict[str, int]:
        """entries, bytes, hits, misses, evictions."""
        return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


__all__ = ["BoundedLRU", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "tensor_bytes"]
