"""The one base class of every expected error, and the CLI's one failure path.

An *expected* error is bad input or a bad environment that the user can fix
(a malformed config, a missing model, a run directory in use): its `str()`
is one line per problem, naming the file, the key or line, and what was
expected. Anything else is a bug and keeps its traceback.

Exit-code policy of every `stepforge` command: 0 success, 1 the command ran
but its subject did not pass (a candidate failed verification), 2 an
expected error (`StepforgeError`), 130 interrupted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class StepforgeError(Exception):
    """Base of every expected error; `str()` is the message shown to the user."""


class ConfigError(StepforgeError, ValueError):
    """A bad config, override or settings file; `str()` names the file, key and expectation."""


def fail(message: object, code: int = EXIT_ERROR) -> NoReturn:
    """Print `error: <line>` for each line of `message` on stderr and exit with `code`."""
    import typer

    for line in str(message).strip().splitlines() or ["error"]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn every `StepforgeError` raised inside into `fail(...)`: one line per problem, exit 2."""
    try:
        yield
    except StepforgeError as exc:
        fail(exc)


def short_repr(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, never rendering more of a huge value than it shows."""
    import reprlib

    shorter = reprlib.Repr()
    shorter.maxlevel, shorter.maxlist, shorter.maxtuple, shorter.maxdict, shorter.maxset = 3, 6, 6, 6, 6
    shorter.maxstring, shorter.maxlong, shorter.maxother = limit, 40, limit
    text = shorter.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



def short_text(text: object, limit: int = 160) -> str:
    """`str(text)` on one line (runs of whitespace become one space), cut to `limit` characters."""
    try:
        line = " ".join(str(text)[: limit * 4].split())
    except Exception:  # noqa: BLE001 - an object whose text cannot be made
        line = f"<{type(text).__name__}>"
    return line if len(line) <= limit else line[: limit - 3] + "..."
