"""Errors of the STeP simulator. Each has a one-line `message` fit to show a model."""

from __future__ import annotations

import math

from stepforge.errors import StepforgeError

MAX_EXACT_DIGITS = 15


def format_int(value: int, grouped: bool = False) -> str:
    """An integer for a message: exact up to 15 digits, else `about 1.23e+4000`.

    Never converts a huge integer to decimal (slow, and past Python's digit
    limit it raises), so a message stays short whatever a program multiplies.
    """
    value = int(value)
    if abs(value) < 10**MAX_EXACT_DIGITS:
        return f"{value:,}" if grouped else str(value)
    exponent = math.log10(abs(value))
    whole = int(exponent)
    sign = "-" if value < 0 else ""
    return f"about {sign}{10 ** (exponent - whole):.3g}e+{whole}"



class SimulatorError(StepforgeError):
    """Base class; `message` is one line, `line` the program line (or None)."""

    stage = "runtime"

    def __init__(self, message: str, line: int | None = None):
        self.message = message if line is None else f"line {line}: {message}"
        self.line = line
        super().__init__(self.message)


class ProgramSyntaxError(SimulatorError):
    """The program text is not in the STeP language (docs/language.md section 3)."""

    stage = "parse"


class StepTypeError(SimulatorError):
    """An operator's typing rule is broken, or a name is unknown."""

    stage = "type"


class ResourceError(SimulatorError):
    """A tensor would exceed the configured element budget."""

    stage = "resource"


class StepRuntimeError(SimulatorError):
    """A failure while running: a fn body raised, returned the wrong shape, or routes disagree."""

    stage = "runtime"


class FnLanguageError(SimulatorError):
    """A model-written fn body that is outside the fn language (docs/language.md, section 5a); none of it ran.

    The message reads `fn <func_name>, line <n>: <construct> is not allowed`.
    """

    stage = "fns"

    def __init__(self, func_name: str, line: int | None, what: str):
        where = f"fn {func_name}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {what}")
        self.func_name = func_name
        self.line = line
        self.what = what
