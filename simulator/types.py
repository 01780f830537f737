"""Element types of STeP streams: fp32 scalars, Buffers, Multihots and tuples.

One element's tensor shape: `()` for fp32, the buffer dims reversed then the
inner element's axes for a Buffer, `(E,)` for a Multihot. A tuple type is a
list of fields, each held as its own tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from stepforge.simulator.shapes import Dim, Shape, as_dim, format_shape

SCALAR_DTYPES = ("fp32",)


@dataclass(frozen=True)
class ScalarType:
    dtype: str = "fp32"

    def elem_dims(self) -> Shape:
        return ()

    def fields(self) -> tuple["LeafType", ...]:
        return (self,)

    def __str__(self) -> str:
        return self.dtype


@dataclass(frozen=True)
class MultihotType:
    dtype: str
    width: Dim

    def elem_dims(self) -> Shape:
        return (self.width,)

    def fields(self) -> tuple["LeafType", ...]:
        return (self,)

    def __str__(self) -> str:
        return f"Multihot({self.dtype}, {self.width})"


@dataclass(frozen=True)
class BufferType:
    inner: Union[ScalarType, MultihotType]
    dims: Shape

    def elem_dims(self) -> Shape:
        return tuple(reversed(self.dims)) + self.inner.elem_dims()

    def fields(self) -> tuple["LeafType", ...]:
        return (self,)

    def __str__(self) -> str:
        return f"Buffer({self.inner}, {format_shape(self.dims)})"


LeafType = Union[ScalarType, MultihotType, BufferType]


@dataclass(frozen=True)
class TupleType:
    items: tuple[LeafType, ...]

    def fields(self) -> tuple[LeafType, ...]:
        return self.items

    def elem_dims(self) -> Shape:
        raise TypeError("a tuple type has one tensor per field; use fields()")

    def __str__(self) -> str:
        return "[" + ", ".join(str(f) for f in self.items) + "]"


ElemType = Union[ScalarType, MultihotType, BufferType, TupleType]


def make_buffer(inner: ElemType, dims: Shape) -> BufferType:
    """`Buffer(inner, dims)`, flattening a Buffer of a Buffer as Bufferize does."""
    if isinstance(inner, BufferType):
        return BufferType(inner.inner, inner.dims + tuple(dims))
    if isinstance(inner, TupleType):
        raise TypeError("a Buffer of a tuple type is not a STeP type")
    return BufferType(inner, tuple(dims))


def make_tuple(fields: "list[ElemType] | tuple[ElemType, ...]") -> ElemType:
    """A tuple of the given types, flattened; a single field is that field's type."""
    flat: list[LeafType] = []
    for f in fields:
        flat.extend(f.fields())
    return flat[0] if len(flat) == 1 else TupleType(tuple(flat))


_TOKEN = re.compile(r"\s*(Buffer|Multihot|fp32|[A-Za-z_][A-Za-z_0-9]*|\d+|[(),\[\]*/])")


def parse_dtype(spec: "str | list | tuple") -> ElemType:
    """An element type from a task file's dtype (a string, or a list for a tuple)."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("a tuple dtype must list at least one field")
        return make_tuple([parse_dtype(s) for s in spec])
    if not isinstance(spec, str):
        raise ValueError(f"a dtype must be a string or a list, got {spec!r}")
    parser = _DtypeParser(spec)
    result = parser.parse_type()
    parser.expect_end()
    return result


class _DtypeParser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                self.fail(f"unexpected character {text[pos]!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i = 0

    def fail(self, why: str):
        raise ValueError(
            f"cannot read dtype {self.text!r}: {why}; expected fp32, Buffer(T, [dims]), Multihot(fp32, E)"
        )

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            self.fail(f"expected {expected or 'more'} but found {tok or 'the end'}")
        self.i += 1
        return tok

    def expect_end(self):
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()!r}")

    def parse_type(self) -> ElemType:
        tok = self.take()
        if tok in SCALAR_DTYPES:
            return ScalarType(tok)
        if tok == "Multihot":
            self.take("(")
            dtype = self.take()
            if dtype not in SCALAR_DTYPES:
                self.fail(f"Multihot of {dtype}")
            self.take(",")
            width = self.parse_dim()
            self.take(")")
            return MultihotType(dtype, width)
        if tok == "Buffer":
            self.take("(")
            inner = self.parse_type()
            self.take(",")
            self.take("[")
            dims = [self.parse_dim()]
            while self.peek() == ",":
                self.take(",")
                dims.append(self.parse_dim())
            self.take("]")
            self.take(")")
            return make_buffer(inner, tuple(dims))
        self.fail(f"unknown type {tok!r}")

    def parse_dim(self) -> Dim:
        text = self.take()
        while self.peek() in ("*", "/"):
            text += self.take() + self.take()
        try:
            return as_dim(int(text) if text.isdigit() else text)
        except ValueError as exc:
            self.fail(str(exc))
