"""The portfolio: several searches of one task side by side, their candidates merged by share.

`portfolio_members` makes the searches of one request (one per heuristic
weight under the learned prior, and with demonstrations one more under the
base prior, `SearchConfig.base_share` of the samples); they all hold the same
`TaskTables`. `interleave` runs them in turns and gives their candidates in
proportion to their shares.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

from stepforge.loop.search.config import SearchConfig
from stepforge.loop.search.prior import OpPrior
from stepforge.loop.search.results import Candidate, SearchStats
from stepforge.loop.search.searcher import Search
from stepforge.loop.search.tables import TaskTables

SLICE = 64  # expansions per portfolio turn, split among the members by share
PATIENCE = 400  # expansions the owing member may take before a waiting candidate of another member is given
_DONE = object()


def portfolio_members(tables: TaskTables, prior: OpPrior, config: SearchConfig, *, n: int, temperature: float,
                      seed: int) -> list[tuple[Search, float]]:
    """The searches of one request with their shares of the samples (they sum to 1)."""
    priors = [(prior, 1.0)]
    if prior.n_programs and config.base_share > 0:
        priors = [(prior, 1.0 - config.base_share), (OpPrior(mix=config.mix), config.base_share)]
    weights = config.heuristic_weights
    members: list[tuple[Search, float]] = []
    for k, (p, p_share) in enumerate(priors):
        # the learned prior runs at every weight; the base prior (a safeguard) in the prior's own order only
        ws = weights if k == 0 else weights[:1]
        for w in ws:
            members.append((Search(tables, p, config, n=n, temperature=temperature, seed=seed, weight=w),
                            p_share / len(ws)))
    return members


def interleave(members: list[tuple[Search, float]], n: int, stats: SearchStats) -> Iterator[Candidate]:
    """Several searches of one task: candidates in proportion to their shares, expansions interleaved.

    The next candidate is owed by the member furthest below its share of the
    candidates given so far. Members take turns of `SLICE * share`
    expansions: the owing member always, the others while they have no
    candidate waiting. The owing member's candidate is given as soon as it
    has one; if it has gone `PATIENCE` expansions without one while another
    member has a candidate waiting, that one is given instead (so a member
    that is stuck does not hold back what the others found). Duplicates are
    dropped. Each member stops on its own per-sample budget; the portfolio
    stops at `n` programs or when every member stopped.
    """
    start = time.perf_counter()
    total = sum(w for _, w in members if w > 0)
    runs = [Member(s, w / total) for s, w in members if w > 0]
    seen: set[str] = set()

    def sync(stopped: str = "") -> None:
        stats.expansions = sum(r.search.stats.expansions for r in runs)
        stats.generated = sum(r.search.stats.generated for r in runs)
        stats.rejected = sum(r.search.stats.rejected for r in runs)
        stats.seconds = time.perf_counter() - start
        if stopped:
            stats.stopped = stopped

    def give(member: Member) -> Optional[Candidate]:
        while member.queue:
            item = member.queue.pop(0)
            if item.text in seen:
                continue
            seen.add(item.text)
            member.given += 1
            stats.candidates += 1
            sync()
            return Candidate(item.text, item.cost, stats.expansions, stats.seconds, item.statements)
        return None

    while stats.candidates < n:
        live = [r for r in runs if r.alive or r.queue]
        if not live:
            break
        owing = min(live, key=lambda r: ((r.given + 1) / r.share, runs.index(r)))
        cand = give(owing)
        if cand is not None:
            yield cand
            continue
        if not owing.alive:
            continue
        if owing.waiting >= PATIENCE:
            others = sorted((r for r in runs if r is not owing and r.queue), key=lambda r: (r.given + 1) / r.share)
            cand = next((c for c in (give(r) for r in others) if c is not None), None)
            if cand is not None:
                yield cand
                continue
        for r in runs:
            if r.alive and (r is owing or not r.queue):
                r.turn(max(1, round(SLICE * r.share)))
    reasons = sorted({r.search.stats.stopped for r in runs if r.search.stats.stopped})
    sync("n" if stats.candidates >= n else "/".join(reasons) or "exhausted")


class Member:
    """One search in a portfolio: its generator, share, waiting candidates."""

    def __init__(self, search: Search, share: float):
        self.search = search
        self.steps = search.steps()
        self.share = share
        self.queue: list[Candidate] = []
        self.given = 0
        self.alive = True
        self.waiting = 0  # expansions since this member last found a candidate

    def turn(self, expansions: int) -> None:
        """Run up to `expansions` expansions, stopping early at a candidate."""
        while expansions > 0:
            item = next(self.steps, _DONE)
            if item is _DONE:
                self.alive = False
                return
            if item is None:
                expansions -= 1
                self.waiting += 1
                continue
            self.queue.append(item)
            self.waiting = 0
            return
