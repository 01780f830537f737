"""Stream types and stream values (tensor layout of docs/language.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch

from stepforge.simulator.shapes import Shape, format_shape, shape_values
from stepforge.simulator.types import ElemType, LeafType


@dataclass(frozen=True)
class StreamType:
    """A stream's element type and shape (dims innermost first).

    Types key the interpreter's caches on every run and their dims hash
    Fractions, so each remembers its hash (not pickled: string hashes differ
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
        stream_axes = tuple(reversed(shape_values(self.shape, binding)))
        return [stream_axes + shape_values(f.elem_dims(), binding) for f in self.fields()]

    def __hash__(self) -> int:
        value = self.__dict__.get("_hash")
        if value is None:
            value = hash((self.elem, self.shape))
            object.__setattr__(self, "_hash", value)
        return value

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

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
