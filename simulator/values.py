"""Stream types and stream values (tensor layout of docs/language.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

from stepforge.simulator.shapes import Shape, format_shape, shape_values
from stepforge.simulator.types import ElemType, LeafType


_MAX_SHAPES_MEMO = 64  # bindings whose tensor shapes one stream type remembers


@dataclass(frozen=True)
class StreamType:
    """A stream's element type and shape (dims innermost first).

    Types key the interpreter's caches and are asked for their tensor shapes
    on every run, so each remembers its hash and, per binding of its size
    symbols, its shapes; neither memo is pickled (string hashes differ
    between processes).
    """

    elem: ElemType
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape) - 1

    def fields(self) -> tuple[LeafType, ...]:
        return self.elem.fields()

    def tensor_shapes(self, binding: Mapping[str, int]) -> list[tuple[int, ...]]:
        """The concrete tensor shape of each field under `binding`."""
        memo = self.__dict__.get("_shapes")
        if memo is None:
            symbols = sorted({name for d in self.shape for name in d.symbols}
                             | {name for f in self.fields() for d in f.elem_dims() for name in d.symbols})
            memo = ({}, tuple(symbols))
            object.__setattr__(self, "_shapes", memo)
        shapes, symbols = memo
        try:
            key = tuple(int(binding[name]) for name in symbols)
        except (KeyError, TypeError, ValueError):
            key = None  # an unbound or odd size: computed (and reported) below
        found = shapes.get(key) if key is not None else None
        if found is None:
            stream_axes = tuple(reversed(shape_values(self.shape, binding)))
            found = [stream_axes + shape_values(f.elem_dims(), binding) for f in self.fields()]
            if key is not None and len(shapes) < _MAX_SHAPES_MEMO:
                shapes[key] = found
        return list(found)

    def __hash__(self) -> int:
        value = self.__dict__.get("_hash")
        if value is None:
            value = hash((self.elem, self.shape))
            object.__setattr__(self, "_hash", value)
        return value

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_shapes")}

    def __str__(self) -> str:
        return f"{self.elem} {format_shape(self.shape)}"


@dataclass
class Stream:
    """A stream value: one tensor, or a list of tensors (one per field) for tuple types."""

    type: StreamType
    data: Union[torch.Tensor, list[torch.Tensor]]

    def field_tensors(self) -> list[torch.Tensor]:
        return list(self.data) if isinstance(self.data, (list, tuple)) else [self.data]

    @staticmethod
    def from_fields(stype: StreamType, fields: list[torch.Tensor]) -> "Stream":
        return Stream(stype, fields[0] if len(stype.fields()) == 1 else list(fields))
