"""What a search gives back: its candidate programs and its running statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    """One program the search found."""

    text: str
    cost: float  # -log prior of its moves (with noise at T > 0)
    expansions: int  # states expanded when it was found (total for this search)
    seconds: float  # search seconds when it was found (total for this search)
    statements: int  # operator applications (Copies included)


@dataclass
class SearchStats:
    """Counters of one search or portfolio, updated as it runs."""

    expansions: int = 0
    generated: int = 0
    candidates: int = 0
    rejected: int = 0  # emitted programs that failed the final static check (should stay 0)
    seconds: float = 0.0
    stopped: str = ""  # "n", "expansions", "seconds", "exhausted"



COST_KEYS = ("expansions", "generated", "candidates")


def search_cost(stats: SearchStats, shares: int = 1) -> dict[str, float]:
    """What a search spent (`COST_KEYS` of its stats), split into `shares` equal parts."""
    shares = max(int(shares), 1)
    return {key: getattr(stats, key) / shares for key in COST_KEYS}
