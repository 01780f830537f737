"""Fitting demonstrations into the model's context.

A prompt is the knowledge, the demonstrations (hardest first) and the task. With
many demonstrations it outgrows the context, so each request keeps the longest
prefix of its demonstrations whose prompt, counted by the model's own tokenizer
(chat template included), leaves `max_tokens` for the answer: the easiest
demonstrations are the ones dropped. The prefix is found by a binary search
that counts every request of a batch in one call per halving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from stepforge.serve.base import GenerationRequest


@dataclass
class Fit:
    """How many demonstrations a request keeps and the prompt tokens with them."""

    keep: int
    prompt_tokens: int


def fit_demonstrations(count: Callable[[list[GenerationRequest]], list[int]],
                       build: Callable[[int, int], GenerationRequest], sizes: Sequence[int], budget: int) -> list[Fit]:
    """For each request i (with `sizes[i]` demonstrations), the largest k whose prompt `build(i, k)`
    has at most `budget` tokens by `count`; k = 0 (with its count) when none fits."""
    tokens: dict[tuple[int, int], int] = {}

    def measure(pairs: list[tuple[int, int]]) -> None:
        todo = [p for p in pairs if p not in tokens]
        for pair, n in zip(todo, count([build(i, k) for i, k in todo])):
            tokens[pair] = n

    measure([(i, size) for i, size in enumerate(sizes)])
    # invariant per request: keeping lo demonstrations fits (-1: none known to), keeping more than hi does not
    lo = {i: -1 for i, size in enumerate(sizes) if tokens[(i, size)] > budget}
    hi = {i: sizes[i] - 1 for i in lo}
    while any(lo[i] < hi[i] for i in lo):
        mids = {i: (lo[i] + hi[i] + 1) // 2 for i in lo if lo[i] < hi[i]}
        measure(list(mids.items()))
        for i, mid in mids.items():
            if tokens[(i, mid)] <= budget:
                lo[i] = mid
            else:
                hi[i] = mid - 1
    out = []
    for i, size in enumerate(sizes):
        keep = size if i not in lo else max(lo[i], 0)
        if (i, keep) not in tokens:
            measure([(i, keep)])
        out.append(Fit(keep, tokens[(i, keep)]))
    return out


__all__ = ["Fit", "fit_demonstrations"]
