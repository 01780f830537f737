"""Errors of the STeP simulator. Each has a one-line `message` fit to show a model."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base class; `message` is one line, `line` the program line (or None)."""

    stage = "runtime"

    def __init__(self, message: str, line: int | None = None):
        self.message = message if line is None else f"line {line}: {message}"
        self.line = line
        super().__init__(self.message)


class ProgramSyntaxError(SimulatorError):
    """The program text is not in the STeP language (STEP_SPEC.md section 5)."""

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
    """A model-written fn body that is outside the fn language (OPEN_MODE.md); none of it ran.

    The message reads `fn <func_name>, line <n>: <construct> is not allowed`.
    """

    stage = "fns"

    def __init__(self, func_name: str, line: int | None, what: str):
        where = f"fn {func_name}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {what}")
        self.func_name = func_name
        self.line = line
        self.what = what
