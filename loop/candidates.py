"""Candidates of both modes as the loop carries them: text.

A closed-mode candidate is a STeP program; an open-mode candidate
(docs/language.md, section 5a) is YAML with `fns` and `impl`, always in the
form `OpenCandidate.to_yaml()` writes (the reply parser re-renders what it
finds), so equal candidates are equal text. These helpers read such text
without running any of it and never raise on bad text.
"""

from __future__ import annotations

import functools
from typing import Optional

from stepforge.benchmark.open_mode import CandidateError, OpenCandidate, load_candidate

MODES = ("closed", "open")


def check_mode(mode: str) -> str:
    """`mode` if it is `closed` or `open`; ValueError naming it otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected closed or open")
    return mode


@functools.lru_cache(maxsize=4096)
def parse_candidate(text: str) -> Optional[OpenCandidate]:
    """The open candidate in `text` (YAML with fns and impl), or None if it is not one."""
    if not isinstance(text, str) or not text.lstrip().startswith("fns"):
        return None
    try:
        return load_candidate(text)
    except (CandidateError, RecursionError, ValueError, TypeError):
        return None


def is_candidate(text: str) -> bool:
    """True when `text` is an open candidate (else it is treated as a closed-mode program)."""
    return parse_candidate(text) is not None


def candidate_impl(text: str) -> str:
    """The program part of a candidate: its impl in open mode, the text itself in closed mode."""
    cand = parse_candidate(text)
    return cand.impl if cand is not None else text


def with_impl(text: str, impl: str) -> str:
    """The open candidate `text` with its impl replaced by `impl` (fns kept); `impl` itself for a program."""
    cand = parse_candidate(text)
    if cand is None:
        return impl
    return OpenCandidate(fns=cand.fns, impl=impl).to_yaml()


__all__ = ["MODES", "candidate_impl", "check_mode", "is_candidate", "parse_candidate", "with_impl"]
