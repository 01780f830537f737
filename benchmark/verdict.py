"""The one verdict type: from the verifier, through the pools and Ray, to the run files.

A `Verdict` says whether one program passed one task and, if not, at which
stage it failed (docs/benchmark.md lists the stages). Two stages are the
loop's own: `generate` (the proposer gave no candidate for the request) and
`pending` (a sample whose verification has not come back yet).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

Stage = Literal["ok", "fns", "parse", "type", "affine", "arity", "dtype", "shape", "value", "timeout", "resource", "runtime",
                "generate", "pending"]
STAGES: tuple[str, ...] = ("ok", "fns", "parse", "type", "affine", "arity", "dtype", "shape", "value", "timeout",
                           "resource", "runtime")  # the verifier's own stages, in pipeline order


class Verdict(BaseModel):
    """The result of verifying one program against one task."""

    passed: bool
    stage: Stage
    message: str = Field(default="", description="one line fit to show a model")
    task: Optional[str] = None
    binding: Optional[dict[str, int]] = Field(default=None, description="the size binding of the failing run")
    seed: Optional[int] = Field(default=None, description="the input seed of the failing run")
    affine_ok: Optional[bool] = Field(default=None, description="None when the program did not parse")
    functional_ok: bool = False
    runs: int = Field(default=0, description="(binding, seed) runs completed")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds: parse, setup, run, check, total")
    seconds: float = Field(default=0.0, description="wall seconds of the whole verification, as its caller saw it")

    def short(self) -> str:
        """`PASS`/`FAIL <stage>: message` on one line."""
        return ("PASS" if self.passed else f"FAIL {self.stage}") + f": {self.message}"

    def timed(self, seconds: float | None = None) -> "Verdict":
        """This verdict with `seconds` set (default: the verifier's own total), rounded to microseconds."""
        secs = seconds if seconds is not None else self.seconds or float(self.timings.get("total", 0.0))
        return self.model_copy(update={"seconds": round(float(secs), 6)})


def failed(stage: str, message: str, **fields) -> Verdict:
    """A failing verdict at `stage`."""
    return Verdict(passed=False, stage=stage, message=message, **fields)
