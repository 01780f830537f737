"""The search proposer: `SearchProposer` (the `Proposer` contract), `search_programs` and `fit_prior`."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

from stepforge.benchmark.schema import FnDecl
from stepforge.loop.candidates import candidate_impl
from stepforge.loop.interfaces import Demonstration, Proposal, ProposalRequest, StreamingProposer
from stepforge.loop.search.config import SearchConfig, as_config
from stepforge.loop.search.open_library import as_candidate, fn_library
from stepforge.loop.search.portfolio import interleave, portfolio_members
from stepforge.loop.search.prior import OpPrior
from stepforge.loop.search.results import Candidate, SearchStats, search_cost
from stepforge.loop.search.tables import TaskTables
from stepforge.loop.search.task import SearchTask


def search_programs(task: SearchTask | str, *,
                    demonstrations: Sequence[Demonstration | tuple[str, Optional[str]] | str] = (),
                    n: int = 1, temperature: float = 0.0, seed: int = 0,
                    config: SearchConfig | Mapping[str, Any] | None = None,
                    prior: Optional[OpPrior] = None, stats: Optional[SearchStats] = None) -> Iterator[Candidate]:
    """Yield up to `n` distinct well-typed candidate programs for `task` (a SearchTask or its IR text).

    `demonstrations` fit the prior (ignored when `prior` is given); `stats`,
    if given, is updated as the search goes.
    """
    cfg = as_config(config)
    spec = task if isinstance(task, SearchTask) else SearchTask.from_ir(task)
    if n <= 0:
        return
    if prior is None:
        prior = fit_prior(demonstrations, cfg, task if isinstance(task, str) else None)
    stats = stats if stats is not None else SearchStats()
    members = portfolio_members(TaskTables(spec, cfg), prior, cfg, n=n, temperature=temperature, seed=seed)
    if len(members) == 1:
        members[0][0].stats = stats
        yield from members[0][0].run()
        return
    yield from interleave(members, n, stats)


def fit_prior(demonstrations: Sequence[Demonstration | tuple[str, Optional[str]] | str],
              config: SearchConfig | Mapping[str, Any] | None = None, target_ir: Optional[str] = None) -> OpPrior:
    """The base prior with the demonstrations' programs counted in (at most `max_demonstrations`).

    With `target_ir`, demonstrations of tasks that look like the target count
    more (`OpPrior.fit`).
    """
    cfg = as_config(config)
    pairs = []
    for d in list(demonstrations)[: cfg.max_demonstrations]:
        if isinstance(d, Demonstration):  # an open demonstration counts its program
            pairs.append((candidate_impl(d.impl), d.task_ir))
        elif isinstance(d, str):
            pairs.append((d, None))
        else:
            pairs.append((d[0], d[1]))
    return OpPrior(mix=cfg.mix).fit(pairs, target_ir=target_ir, floor=cfg.similarity_floor)


OPEN_SUBSET_MAX = 3  # most library fns one open-mode search wires
OPEN_SUBSET_EXPANSIONS = 400
OPEN_SUBSET_SECONDS = 0.5


class SearchProposer(StreamingProposer):
    """The model-free proposer: type-directed best-first search (see loop/search/__init__.py).

    `SearchProposer(config)` takes a `SearchConfig`, a mapping of its keys,
    an object with such a mapping as `.options` (the loop's proposer config),
    or None for the defaults. Construction is cheap and the object pickles
    (its caches are dropped). `propose` returns, per request, up to `n`
    distinct programs in search order; `Proposal.raw` is the program text,
    token counts are 0, `seconds` is the search time spent on that proposal
    (since the previous one; the last one also carries the search after it).
    `last_stats` holds each request's `SearchStats` of the latest call.
    `iter_proposals` gives the same proposals lazily (the executor stops it
    once a sample is correct). A request of round r searches with
    `SearchConfig.for_round(r)`'s expansion budget and at most
    `SearchConfig.candidates(r, n)` programs.

    Open mode (`request.mode == "open"`): the search wires a task's fns, all
    of them, so it runs over subsets of a generated fn library
    (`open_library.py`), smallest first, each with a small budget
    (`OPEN_SUBSET_EXPANSIONS`, `OPEN_SUBSET_SECONDS`) and all within
    `max_seconds` per request; each proposal is a candidate, the library fns
    its program uses and the program.
    """

    name = "search"
    takes_feedback = False  # a verdict does not steer the search: the loop runs no repair turns with it

    def __init__(self, config: SearchConfig | Mapping[str, Any] | None = None, **overrides: Any):
        cfg = as_config(config)
        if overrides:
            cfg = cfg.model_copy(update=SearchConfig(**{**cfg.model_dump(), **overrides}).model_dump())
        self.config = cfg
        self._priors: dict[str, OpPrior] = {}
        self._tasks: dict[str, SearchTask] = {}
        self.last_stats: list[SearchStats] = []

    def __getstate__(self):
        return {"config": self.config.model_dump(), "_priors": {}, "_tasks": {}, "last_stats": []}

    def __setstate__(self, state):
        self.config = SearchConfig(**state["config"])
        self._priors = {}
        self._tasks = {}
        self.last_stats = []

    def _prior(self, demonstrations: Sequence[Demonstration], target_ir: str) -> OpPrior:
        digest = hashlib.sha256("\x00".join([target_ir] + [f"{d.impl}\x01{d.task_ir}" for d in demonstrations])
                                .encode()).hexdigest()
        prior = self._priors.get(digest)
        if prior is None:
            prior = fit_prior(demonstrations, self.config, target_ir)
            if len(self._priors) > 16:
                self._priors.clear()
            self._priors[digest] = prior
        return prior

    def _task(self, request: ProposalRequest) -> SearchTask:
        key = hashlib.sha256(request.task_ir.encode()).hexdigest()
        task = self._tasks.get(key)
        if task is None:
            task = SearchTask.from_task(request.task)
            if len(self._tasks) > 64:
                self._tasks.clear()
            self._tasks[key] = task
        return task

    def iter_candidates(self, request: ProposalRequest, stats: Optional[SearchStats] = None) -> Iterator[Candidate]:
        """The candidates of one request, lazily (for callers that verify as they go)."""
        if request.mode == "open":
            return self._open_candidates(request, stats)
        prior = self._prior(request.demonstrations, request.task_ir)
        n = self.config.candidates(request.round, request.n)
        return search_programs(self._task(request), n=n, temperature=request.temperature,
                               seed=request.seed, config=self.config.for_round(request.round), prior=prior,
                               stats=stats)

    def _open_candidates(self, request: ProposalRequest, stats: Optional[SearchStats]) -> Iterator[Candidate]:
        """Programs over subsets of the generated library (see the class docstring), each once."""
        library = fn_library(request.task)
        small = self.config.model_copy(update={"max_expansions": min(self.config.max_expansions,
                                                                     OPEN_SUBSET_EXPANSIONS),
                                               "max_seconds": min(self.config.max_seconds, OPEN_SUBSET_SECONDS)})
        t0 = time.perf_counter()
        found: set[str] = set()
        for size in range(1, OPEN_SUBSET_MAX + 1):
            for subset in itertools.combinations(library, size):
                if len(found) >= self.config.candidates(request.round, request.n) or time.perf_counter() - t0 > self.config.max_seconds:
                    return
                task = request.task.model_copy(update={"fns": [FnDecl(**f.model_dump()) for f in subset]})
                sub_request = request.model_copy(update={"task": task, "mode": "closed", "n": 1})
                prior = self._prior(request.demonstrations, sub_request.task_ir)
                for cand in search_programs(self._task(sub_request), n=1, temperature=request.temperature,
                                            seed=request.seed, config=small, prior=prior):
                    if cand.text not in found:
                        found.add(cand.text)
                        if stats is not None:
                            stats.candidates += 1
                        yield dataclasses.replace(cand, seconds=time.perf_counter() - t0)
        if stats is not None:
            stats.seconds = time.perf_counter() - t0

    def iter_proposals(self, request: ProposalRequest, stats: Optional[SearchStats] = None) -> Iterator[Proposal]:
        """The request's proposals one at a time; `seconds` and `cost` are the search since the previous one."""
        stats = stats if stats is not None else SearchStats()
        last, spent = 0.0, search_cost(stats)
        library = fn_library(request.task) if request.mode == "open" else None
        for cand in self.iter_candidates(request, stats):
            now = search_cost(stats)
            raw = cand.text if library is None else as_candidate(cand.text, library)
            yield Proposal(raw=raw, messages=None, prompt_tokens=0, completion_tokens=0,
                           seconds=round(cand.seconds - last, 6), cost={k: now[k] - spent[k] for k in now})
            last, spent = cand.seconds, now

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        results: list[list[Proposal]] = []
        self.last_stats = []
        for request in requests:
            stats = SearchStats()
            proposals = list(self.iter_proposals(request, stats))
            spent = sum(p.seconds for p in proposals)
            if proposals and stats.seconds > spent:  # the search after the last program counts too
                tail = proposals[-1]
                proposals[-1] = tail.model_copy(update={"seconds": round(tail.seconds + stats.seconds - spent, 6)})
            for p in proposals:  # the request's spending, shared equally: per-round sums are the totals
                p.cost = search_cost(stats, len(proposals))
            self.last_stats.append(stats)
            results.append(proposals)
        return results
