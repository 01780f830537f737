"""Errors of the STeP simulator. Each has a one-line `message` fit to show a model."""

from __future__ import annotations

from stepforge.errors import StepforgeError


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
