"""The `stepforge` command line: each subpackage registers its own commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="stepforge: generate, verify and learn STeP programs with LLM agents.",
)

# Each module exposes `register(app)`; heavy imports stay inside the commands.
_COMMAND_MODULES = (
    "stepforge.benchmark.cli",
    "stepforge.serve.cli",
    "stepforge.loop.cli",
    "stepforge.training.cli",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
