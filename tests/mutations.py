"""Token-level mutations of reference solutions: the verifier's mutation corpus.

Each mutation edits one line of a reference program: a number changed, a name
swapped for another name of the program, an operator swapped, a line
deleted, or a line repeated (often a stream consumed twice). Deterministic
for a given seed.
"""

from __future__ import annotations

import random
import re

from stepforge import simulator as sim


def mutations(impl: str, rng: random.Random, count: int) -> list[str]:
    """Up to `count` mutated copies of `impl` (copies equal to it are left out)."""
    ops = list(sim.program.OPS)
    lines = impl.splitlines()
    names = sorted(set(re.findall(r"\b[A-Za-z_]\w*\b", impl)) - {"step", "apply", "return"})
    out = []
    for _ in range(count):
        ls = list(lines)
        i = rng.randrange(len(ls) - 1)
        r = rng.random()
        if r < 0.3:
            ls[i] = re.sub(r"\b\d+\b", str(rng.choice([0, 1, 2, 3, 16])), ls[i])
        elif r < 0.6:
            toks = re.findall(r"\b[A-Za-z_]\w*\b", ls[i])
            ls[i] = ls[i].replace(rng.choice(toks), rng.choice(names), 1)
        elif r < 0.75:
            ls[i] = re.sub(r"step\.\w+", "step." + rng.choice(ops), ls[i], count=1)
        elif r < 0.85:
            del ls[i]
        else:  # a statement repeated: often a stream consumed twice, sometimes harmless
            ls.insert(rng.randrange(len(ls)), ls[i])
        text = "\n".join(ls) + "\n"
        if text != impl:
            out.append(text)
    return out
