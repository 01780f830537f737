"""Symbolic dims: integer-coefficient monomials over named size symbols.

A dim is `coeff * prod(sym ** power)`. This covers every shape STeP builds:
products (Flatten), tiles (Reshape gives `d/X`) and dynamic route sizes
(Partition). Dims compare after simplification, so `M*1 == M`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping

from stepforge.simulator.errors import format_int

DEFAULT_SIZES: dict[str, int] = {"M": 5, "N": 7, "K": 9, "D": 16}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


class SizeSymbol(str):
    """A size symbol's name. A str, so `ctx[E]` and `ctx["E"]` are the same key."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension `coeff * prod(name**power)`, kept in canonical form."""

    coeff: Fraction
    powers: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def const(value: int) -> "Dim":
        return Dim(Fraction(value))

    @staticmethod
    def sym(name: str) -> "Dim":
        return Dim(Fraction(1), ((str(name), 1),))

    @staticmethod
    def _make(coeff: Fraction, powers: dict[str, int]) -> "Dim":
        return Dim(coeff, tuple(sorted((k, v) for k, v in powers.items() if v != 0)))

    def __mul__(self, other: "Dim | int") -> "Dim":
        other = as_dim(other)
        powers = dict(self.powers)
        for name, p in other.powers:
            powers[name] = powers.get(name, 0) + p
        return Dim._make(self.coeff * other.coeff, powers)

    __rmul__ = __mul__

    def __truediv__(self, other: "Dim | int") -> "Dim":
        other = as_dim(other)
        powers = dict(self.powers)
        for name, p in other.powers:
            powers[name] = powers.get(name, 0) - p
        return Dim._make(self.coeff / other.coeff, powers)

    @property
    def is_const(self) -> bool:
        return not self.powers

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.powers)

    def evaluate(self, binding: Mapping[str, int]) -> int:
        """The dim's integer value under `binding`; ValueError if unbound or fractional."""
        if self.coeff.denominator == 1:
            try:  # a whole coefficient and positive powers (almost every dim): integers only
                value = self.coeff.numerator
                for name, power in self.powers:
                    if power < 0:
                        break
                    value *= int(binding[name]) ** power
                else:
                    return value
            except KeyError:
                pass  # reported below
        value = self.coeff
        for name, power in self.powers:
            if name not in binding:
                raise ValueError(f"size {name} has no value")
            value *= Fraction(int(binding[name])) ** power
        if value.denominator != 1:
            raise ValueError(f"{self} is not a whole number for {_fmt_binding(self, binding)}")
        return int(value)

    def __str__(self) -> str:
        num = [n if p == 1 else f"{n}**{p}" for n, p in self.powers if p > 0]
        den = [n if p == -1 else f"{n}**{-p}" for n, p in self.powers if p < 0]
        head = "*".join(num)
        if self.coeff.numerator != 1 or not head:
            numerator = format_int(self.coeff.numerator)
            head = f"{numerator}*{head}" if head else numerator
        tail = den + ([format_int(self.coeff.denominator)] if self.coeff.denominator != 1 else [])
        return head + "".join(f"/{t}" for t in tail)

    __repr__ = __str__


Shape = tuple[Dim, ...]


def _fmt_binding(dim: Dim, binding: Mapping[str, int]) -> str:
    return ", ".join(f"{n}={format_int(binding[n])}" for n in dim.symbols if n in binding)


def as_dim(value: "Dim | int | str") -> Dim:
    """A Dim from an int, a Dim, or text such as `K*N` or `D/2`."""
    if isinstance(value, Dim):
        return value
    if isinstance(value, bool):
        raise ValueError(f"a dim must be an integer or a size symbol, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a dim must not be negative, got {value}")
        return Dim.const(value)
    if isinstance(value, str):
        return _parse_dim_text(value)
    raise ValueError(f"a dim must be an integer or a size symbol, got {value!r}")


def _parse_dim_text(text: str) -> Dim:
    tokens = re.split(r"\s*([*/])\s*", text.strip())
    if not tokens or tokens[0] == "":
        raise ValueError(f"empty dim {text!r}")
    result = _dim_atom(tokens[0], text)
    for op, atom in zip(tokens[1::2], tokens[2::2]):
        result = result * _dim_atom(atom, text) if op == "*" else result / _dim_atom(atom, text)
    return result


def _dim_atom(atom: str, text: str) -> Dim:
    if atom.isdigit():
        return Dim.const(int(atom))
    if _NAME.match(atom):
        return Dim.sym(atom)
    raise ValueError(f"cannot read dim {text!r}: expected an integer, a size symbol or a product such as K*N")


def parse_dims(dims: list | tuple) -> Shape:
    """A shape from a task file's `dims` list (innermost first)."""
    if not isinstance(dims, (list, tuple)) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty list, got {dims!r}")
    return tuple(as_dim(d) for d in dims)


MAX_SHOWN_DIMS = 12


def format_shape(shape: Shape) -> str:
    """`[D, N, M]`; a shape of more than MAX_SHOWN_DIMS dims shows its first and last few."""
    dims = [str(d) for d in shape]
    if len(dims) > MAX_SHOWN_DIMS:
        half = MAX_SHOWN_DIMS // 2
        dims = dims[:half] + [f"... {len(dims) - 2 * half} more ..."] + dims[-half:]
    return "[" + ", ".join(dims) + "]"


def shape_values(shape: Shape, binding: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d.evaluate(binding) for d in shape)


def product(dims: "list[Dim] | tuple[Dim, ...]") -> Dim:
    result = Dim.const(1)
    for d in dims:
        result = result * d
    return result
