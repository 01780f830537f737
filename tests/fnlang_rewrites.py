"""Task-file fn idioms outside the fn language, and their spelling inside it (the same math).

Used by the fn-language and open-mode tests to pose every task's fns as an open candidate.
"""

from __future__ import annotations

import re

REWRITES = [
    (r"(?<![\w.])softmax\((.*)\)\]", r"torch.softmax(\1, dim=-1)]"),  # global `softmax = torch.nn.Softmax(dim=-1)`
    (r"(?<![\w.])(gelu|silu)\(", r"torch.nn.functional.\1("),          # global `gelu = torch.nn.GELU()`
    (r"\.to\((\w+\.dtype|torch\.float64)\)", ""),                      # casts: outputs are made fp32 anyway
    (r", dtype=torch\.float64", ""),                                   # rope's angles: float32, not float64
    (r"\.values\b", "[0]"),                                            # the values of topk / max
]

# Rewrites that change the float precision, so results agree within rounding, not bit for bit.
INEXACT = ("dtype=torch.float64",)


def in_language(apply: str) -> str:
    """`apply` with every idiom of REWRITES replaced by its in-language spelling."""
    for pattern, replacement in REWRITES:
        apply = re.sub(pattern, replacement, apply)
    return apply


def exact(apply: str) -> bool:
    """Whether `in_language(apply)` computes bit for bit what `apply` does."""
    return not any(text in apply for text in INEXACT)
