"""Name-to-implementation registries (backends, proposers, guardians, verifier kinds, engines).

An entry is either the implementation itself or a `"module:attribute"` path
imported on first use, so heavy libraries (vLLM, Ray, torch) load only when
the name is asked for. An unknown name is a `ConfigError` listing the known ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar, Union

from stepforge.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind of implementation (`kind` appears in errors: "backend", "guardian", ...)."""

    def __init__(self, kind: str, entries: dict[str, Union[str, T]] | None = None):
        self.kind = kind
        self._entries: dict[str, Union[str, T]] = dict(entries or {})

    def register(self, name: str, target: Union[str, T, None] = None) -> Callable[[T], T] | None:
        """Register `target` under `name`; without `target`, a decorator that registers what it decorates."""
        if target is not None:
            self._entries[name] = target
            return None

        def decorate(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The implementation named `name`, imported on first use."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """`get(name)(*args, **kwargs)`."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
