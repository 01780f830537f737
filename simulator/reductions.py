"""Folds that are running sums or running maxima, computed without a step loop.

Most folds in task files are `return [state[0] + input[0]]` (a sum) or
`return [torch.maximum(state[0], input[0])]` (a maximum). The vectorised
engine would call such a body once per folded position (16 thousand calls for
a Scan that numbers every element of a (32, 32, 16) stream); here the whole
fold is one cumsum / sum / cummax / amax over the step axis. A body is
recognised from its text only (it is matched, never run): every output field
i must be exactly `state[i] + input[j]` or `torch.maximum(state[i], input[j])`,
with input field j of field i's element shape. Anything else, or inputs with a
NaN (where cummax and a step-by-step maximum may disagree), returns None and
the caller folds step by step; so does `batching.fast_batching(False)`, which
turns every shortcut off (the verdict-equivalence tests compare both ways).

Sums accumulate in a different order than the step loop (a running sum on CPU
accumulates in float64), so results agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import torch

from stepforge.simulator.batching import fast_batching_enabled

_TERM = re.compile(r"state\[(\d+)\]\+input\[(\d+)\]|torch\.maximum\(state\[(\d+)\],input\[(\d+)\]\)")
_MAX_SOURCE = 400  # a recognisable body is short; longer text is not scanned


def recognise(source: str) -> Optional[tuple[tuple[str, int], ...]]:
    """Per output field ("sum" | "max", input field), or None if the body is not a plain running reduction."""
    if len(source) > _MAX_SOURCE or "#" in source:
        return None  # decided before the cache, so the cache only ever holds short texts
    return _recognise_short(source)


@functools.lru_cache(maxsize=4096)
def _recognise_short(source: str) -> Optional[tuple[tuple[str, int], ...]]:
    text = re.sub(r"\s+", "", source)
    if text.startswith("return"):
        text = text[len("return"):]
    if len(text) < 2 or text[0] not in "[(" or text[-1] != {"[": "]", "(": ")"}[text[0]]:
        return None
    inner, pos, terms = text[1:-1], 0, []
    while pos < len(inner):
        m = _TERM.match(inner, pos)
        if m is None:
            return None
        sum_state, sum_input, max_state, max_input = m.groups()
        state_index = int(sum_state if sum_state is not None else max_state)
        if state_index != len(terms):
            return None
        terms.append(("sum", int(sum_input)) if sum_state is not None else ("max", int(max_input)))
        pos = m.end()
        if pos < len(inner):
            if inner[pos] != ",":
                return None
            pos += 1
    return tuple(terms) or None


def running_reduction(source: str, state: list[torch.Tensor], inputs: list[torch.Tensor],
                      keep_all: bool) -> Optional[list[torch.Tensor]]:
    """The fold of `inputs` (batch, steps, ...) from `state` (batch, ...) if `source` is a running sum/max.

    Returns the final states (batch, ...), or with `keep_all` every step's state
    (batch, steps, ...); None where the body is not recognised or the shapes and
    values do not allow it (the caller then folds step by step).
    """
    if not fast_batching_enabled():
        return None
    terms = recognise(source)
    if terms is None or len(terms) != len(state) or not inputs or inputs[0].shape[1] == 0:
        return None
    out = []
    for (kind, j), s in zip(terms, state):
        if j >= len(inputs):
            return None
        x = inputs[j]
        if x.dtype is not torch.float32 or s.dtype is not torch.float32 or x.shape[:1] + x.shape[2:] != s.shape:
            return None
        if kind == "sum":
            if keep_all:
                out.append(torch.cumsum(torch.cat([s.unsqueeze(1), x], 1), 1)[:, 1:])
            else:
                out.append(s + x.sum(1))
        else:
            if torch.isnan(x).any() or torch.isnan(s).any():
                return None
            if keep_all:
                out.append(torch.maximum(s.unsqueeze(1), torch.cummax(x, 1).values))
            else:
                out.append(torch.maximum(s, x.amax(1)))
    return out


__all__ = ["recognise", "running_reduction"]
