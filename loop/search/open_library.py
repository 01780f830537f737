"""The search baseline's fns in open mode: a generated library of typed generic fns.

An open task has no fns; the search proposer, which only wires fns, is given
a library built from the task's declared types and parameters, every body
written in the fn language (docs/language.md, section 5a), and searches programs over it as
over task fns. A found program becomes a candidate with the library fns it
uses (`as_candidate`). The library:

- per element type T of the task's streams (fields of tuple types too):
  elementwise maps [T, T] -> T (add, sub, mul, div, maximum) and T -> T
  (exp, neg), and folds T -> T (sum, init 0; max, init -inf);
- per 1-D buffer type Buffer(fp32, [X]): reductions to fp32 (sum, amax),
  scaling [fp32, Buffer] -> Buffer (mul) and [Buffer, fp32] -> Buffer (div);
- per declared parameter P: one matmul fn per orientation (a 2-D P of shape
  (R, C): Buffer[R] @ P -> Buffer[C] and P @ Buffer[C] -> Buffer[R]; a 1-D P
  of length R: Buffer[R] @ P -> fp32 and fp32 * P -> Buffer[R]).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from stepforge.benchmark.open_mode import CandidateFn, OpenCandidate

_BINARY = {"add": "input[0] + input[1]", "sub": "input[0] - input[1]", "mul": "input[0] * input[1]",
           "div": "input[0] / input[1]", "max": "torch.maximum(input[0], input[1])"}
_UNARY = {"exp": "torch.exp(input[0])", "neg": "-input[0]"}
_FOLDS = {"sum": ("state[0] + input[0]", 0.0), "max": ("torch.maximum(state[0], input[0])", "-inf")}
_BUFFER_1D = re.compile(r"^Buffer\(fp32, \[(\w+)\]\)$")


def _leaf_types(dtypes: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for d in dtypes:
        for leaf in (d if isinstance(d, list) else [d]):
            if str(leaf) not in out and not str(leaf).startswith("Multihot"):
                out.append(str(leaf))
    return out


def fn_library(task: Any) -> list[CandidateFn]:
    """The generated fns for `task` (a Task), in a fixed order (see the module docstring)."""
    fns: list[CandidateFn] = []

    def add(name: str, in_t, out_t, body: str, init=None) -> None:
        fns.append(CandidateFn(name=name, func_name=f"fn_{name}", input_dtype=in_t, output_dtype=out_t,
                               apply=f"return [{body}]\n", init=init))

    types = _leaf_types([s.dtype for s in list(task.inputs) + list(task.outputs)])
    for i, t in enumerate(types):
        for op, body in _BINARY.items():
            add(f"{op}_{i}", [t, t], t, body)
        for op, body in _UNARY.items():
            add(f"{op}_{i}", t, t, body)
        for op, (body, init) in _FOLDS.items():
            add(f"{op}_fold_{i}", t, t, body, init)
        m = _BUFFER_1D.match(t)
        if m:
            add(f"sum_all_{i}", t, "fp32", "torch.sum(input[0])")
            add(f"max_all_{i}", t, "fp32", "torch.amax(input[0])")
            if "fp32" in types:
                add(f"scale_{i}", ["fp32", t], t, "input[0] * input[1]")
                add(f"unscale_{i}", [t, "fp32"], t, "input[0] / input[1]")
    for p in task.parameters:
        if p.dtype != "fp32":
            continue
        shape = [str(d) for d in reversed(p.dims)]  # dims are innermost first; the tensor is outermost first
        name = re.sub(r"\W", "_", p.name)
        ref = f"input_data['{p.name}']"
        if len(shape) == 2:
            rows, cols = shape
            add(f"x_{name}", f"Buffer(fp32, [{rows}])", f"Buffer(fp32, [{cols}])", f"input[0] @ {ref}")
            add(f"{name}_x", f"Buffer(fp32, [{cols}])", f"Buffer(fp32, [{rows}])", f"{ref} @ input[0]")
        elif len(shape) == 1:
            add(f"dot_{name}", f"Buffer(fp32, [{shape[0]}])", "fp32", f"input[0] @ {ref}")
            add(f"scale_{name}", "fp32", f"Buffer(fp32, [{shape[0]}])", f"input[0] * {ref}")
    return fns


def library_task(task: Any) -> Any:
    """`task` with the generated library as its fns (what the search sees in open mode)."""
    from stepforge.benchmark.schema import FnDecl

    return task.model_copy(update={"fns": [FnDecl(**f.model_dump()) for f in fn_library(task)]})


def as_candidate(program: str, library: Sequence[CandidateFn]) -> str:
    """The open candidate of a program found over `library`: the fns it names, and the program."""
    used = [f for f in library if re.search(rf"\b{re.escape(f.func_name)}\b", program)]
    return OpenCandidate(fns=used, impl=program).to_yaml()


__all__ = ["as_candidate", "fn_library", "library_task"]
