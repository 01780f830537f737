"""Task-file fn idioms outside the fn language, and their spelling inside it (the same math).

The benchmark's task files were rewritten with `in_language` so that every task fn is
inside the language; `ORIGINALS` keeps the bodies they had, so the differential test
proves each rewrite computes what the original did.
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


# The 32 task fns that were outside the language before their task files were rewritten (with
# `in_language`): each original body -> the fns (`<task key>:<func_name>`) that had it. The
# differential test holds each task file's body to its original, run as trusted Python.
ORIGINALS: dict[str, list[str]] = {
    'position, x = input\n'
    'half = D_value // 2\n'
    'inv_freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / D_value)\n'
    'angle = position.to(torch.float64) * inv_freq\n'
    'cos = torch.cos(angle).to(x.dtype)\n'
    'sin = torch.sin(angle).to(x.dtype)\n'
    'first, second = x[:half], x[half:]\n'
    'return [torch.cat([first * cos - second * sin, second * cos + first * sin])]\n':
        ['rope/G_0_3_02:fn_rotate', 'rope/G_0_4_01:fn_rotate'],
    'position, x = input\n'
    'half = D_value // 2\n'
    'inv_freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / D_value)\n'
    'angle = position.to(torch.float64) * inv_freq\n'
    'cos = torch.cos(angle).to(x.dtype)\n'
    'sin = torch.sin(angle).to(x.dtype)\n'
    'even, odd = x[0::2], x[1::2]\n'
    'return [torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten()]\n':
        ['rope/G_0_3_03:fn_rotate'],
    "[softmax(input[0] @ input_data['Wg'])]\n":
        ['moe-index/G_0_13_02:fn_gate', 'moe-index/G_0_3_03:fn_gate', 'moe-end-to-end/G_0_9_01:fn_gate',
         'moe-end-to-end/G_0_9_02:fn_gate'],
    's = input[0]\n'
    'third = s.topk(3, dim=-1).values[..., 2:3]\n'
    'return [(s >= third).to(s.dtype)]\n':
        ['moe-index/G_0_13_02:fn_top3', 'moe-index/G_0_7_03:fn_top3', 'moe-end-to-end/G_0_12_01:fn_top3'],
    'a = input[0]\n'
    'return [(a >= a.max(dim=-1, keepdim=True).values).to(a.dtype)]\n':
        ['moe-index/G_0_3_03:fn_top1', 'moe-end-to-end/G_0_9_01:fn_top1'],
    "[torch.sigmoid(silu(input[0] @ input_data['Wa_0']) @ input_data['Wa_1'])]\n":
        ['moe-index/G_0_3_04:fn_score', 'moe-end-to-end/G_0_10:fn_score'],
    's = input[0]\n'
    'return [torch.stack([s > 0.5, s <= 0.5], dim=-1).to(s.dtype)]\n':
        ['moe-index/G_0_3_04:fn_filter', 'moe-expert/G_0_5_02:fn_filter', 'moe-end-to-end/G_0_10:fn_filter',
         'moe-end-to-end/G_0_12_01:fn_filter'],
    'x = input[0]\n'
    'a = input[1]\n'
    "return [a[..., None] * gelu(x @ input_data['W']) + x]\n":
        ['moe-expert/G_0_5_02:fn_expert_mlp', 'moe-expert/G_0_7_01:fn_expert_mlp',
         'moe-end-to-end/G_0_10:fn_expert_mlp', 'moe-end-to-end/G_0_12_01:fn_expert_mlp'],
    "y = gelu(input[0] @ input_data['W0_0']) @ input_data['W0_1']\n"
    'return [y, input[1][..., 0]]\n':
        ['moe-expert/G_0_6_05:fn_expert0'],
    "y = gelu(input[0] @ input_data['W1_0']) @ input_data['W1_1']\n"
    'return [y, input[1][..., 1]]\n':
        ['moe-expert/G_0_6_05:fn_expert1'],
    "y = gelu(input[0] @ input_data['W2_0']) @ input_data['W2_1']\n"
    'return [y, input[1][..., 2]]\n':
        ['moe-expert/G_0_6_05:fn_expert2'],
    "y = gelu(input[0] @ input_data['W0_0']) @ input_data['W0_1']\n"
    'return [y * input[1][..., 0:1]]\n':
        ['moe-end-to-end/G_0_9_01:fn_expert0', 'moe-end-to-end/G_0_9_02:fn_expert0'],
    "y = gelu(input[0] @ input_data['W1_0']) @ input_data['W1_1']\n"
    'return [y * input[1][..., 1:2]]\n':
        ['moe-end-to-end/G_0_9_01:fn_expert1', 'moe-end-to-end/G_0_9_02:fn_expert1'],
    "y = gelu(input[0] @ input_data['W2_0']) @ input_data['W2_1']\n"
    'return [y * input[1][..., 2:3]]\n':
        ['moe-end-to-end/G_0_9_01:fn_expert2', 'moe-end-to-end/G_0_9_02:fn_expert2'],
    'a = input[0]\n'
    'second = a.topk(2, dim=-1).values[..., 1:2]\n'
    'return [(a >= second).to(a.dtype)]\n':
        ['moe-end-to-end/G_0_9_02:fn_top2'],
}
