"""A search-based proposer that needs no model: type-directed synthesis of STeP programs.

`SearchProposer` implements the `Proposer` contract (loop/interfaces.py) with
a best-first (weighted A*) search over well-typed programs. It is what
`stepforge improve` uses when no model is configured.

The search
----------
A search state is the multiset of *live* streams: typed streams not yet
consumed (the task's inputs at the start). A move applies one operator to
live streams and makes new ones; every move is typed by the simulator's own
rules (`stepforge.simulator.ops.resolve_params` / `infer` with a
`TypeContext`), so only well-typed programs are ever built. Moves are

* fn applications: `Map(fn=f)` of a non-fold fn on a stream whose element
  type is `f`'s input, `Accum(fn=f, b=k)` / `Scan(fn=f, b=k)` of a fold fn;
* `Zip` of two equal-shaped streams whose fields are a contiguous part of
  some fn's input (so a Zip is only made to feed a fn);
* glue that adapts one stream toward a target type: `Bufferize`,
  `Streamify`, `Promote`, `Repeat(n=<a size of the task>)`, `Flatten`,
  `RepeatRef` (and `Reshape` if `allow_reshape`). A glue move is only made
  if it brings the stream strictly closer to some target (a fn input type,
  an output's type and shape, or the shape of a stream it must be zipped
  with) by the glue distance below, and never back to a type it already had;
* routing: with a Multihot stream of width E and a group of E fns with equal
  types (the experts), the Partition -> `[Map(fn=f) for p, f in zip(parts,
  fns)]` -> Merge pattern as one move (its index stream is copied).

Affinity holds by construction: a move either *consumes* an input stream or
*borrows* it, which is emitted as `a, b = step.Copy().apply(x)` (one copy is
used, the other stays live). A goal is a state whose live streams are exactly
the task's outputs (types and symbolic shapes; every other stream was
consumed) and in which every task fn has been applied. Each goal gives one
candidate per way of assigning its streams to the outputs.

Order and heuristic: a move costs `-log P` of its tokens under the prior
(loop/search/prior.py: a trigram over operator tokens plus a fn-order model,
learned from the demonstrations), plus, at temperature T > 0,
`T * noise * Exp(1)` of seeded noise (so T = 0 is the prior's order, larger T
is flatter, and a seed fixes the order). States are expanded in order of
`g + w * h` (w from `heuristic_weights`), where `h` counts the glue each live stream still
needs to reach its nearest target (an alignment of its dims, innermost first,
against the target's, costing Repeat/Promote insertions, Flatten merges and
the Bufferize/Streamify moves of the buffer boundary), one application per
unused fn, one Zip per fn whose input no live stream has yet, and the live
streams in excess of the outputs. A live stream that no target can be reached
from (wrong leaf type, a dim glue cannot remove) makes the state dead.

Portfolio: one request runs several searches of the same task side by side
(sharing one `TaskTables`: all typing and distance tables): one per heuristic weight in
`heuristic_weights` (the first follows the prior closely, a larger one is
greedier and reaches long programs sooner), and, with demonstrations, one
more under the base prior at the first weight (`base_share` of the samples).
Expansions are interleaved; candidates are given in proportion to the
members' shares (a member stuck for `PATIENCE` expansions does not hold back
what another found); duplicates are dropped.

Learning from experience: the prior is fitted on the demonstrations' impls,
so earned programs make the operator sequences they contain cheap and later
searches reach similar programs in far fewer expansions. Because the type
system cannot tell apart many wrong programs from the right one, any prior
only re-orders candidates; the base-prior member makes sure demonstrations
cannot push a program the base prior finds out of reach: what it finds as
its k-th program is in the portfolio's list by about the (k / base_share)-th.

Budget: for each sample, each search of the portfolio may take at most
`max_expansions` expansions and `max_seconds` seconds of its own work after
its previous program; the portfolio stops at `n` distinct programs or when
every search has spent its budget. With the expansion budget binding, the
result is a function of (task, demonstrations, n, temperature, seed, config).
`expansion_schedule` / `candidate_schedule` set `max_expansions` and the
programs per request by Algorithm 1's round (`ProposalRequest.round`).
`SearchProposer.iter_proposals` gives a request's programs lazily, so the
loop's executor stops the search once one is verified correct
(loop/early_stop.py).

Every emitted program is parsed, type-checked (`typecheck_program`) against
the task's types, checked for the affine rule and for the declared output
types before it is returned; the proposer cannot run programs (the loop's
verifier does), so this static check is its whole pre-ranking.

Known limits (measured by scripts/bench_search.py). Types cannot tell apart
programs that wire fns of equal types differently (which of two fp32 streams
is divided by which, whether a statistic is a running Scan or an Accum
repeated back): norm/G_0_8_01 and norm/G_0_9_02 are found only after
hundreds of well-typed wrong candidates, which the verifier has to reject.
norm/G_0_16_01 (16 statements, three Copies, four fns applied twice) is out
of reach: too many equally typed wirings. moe-end-to-end/G_0_12_01 is not
found cold: the heuristic only looks one fn ahead, so the glue between two
future fn applications (Promote/Bufferize before, Streamify/Flatten after a
top-3 over tokens) is not anticipated; with demonstrations that contain that
chain (moe-index/G_0_7_03) it is found at once.
Modules
-------
config.py     `SearchConfig`, the settings
task.py       `SearchTask`: what the search reads from the task IR
prior.py      `OpPrior`: the operator-token trigram and fn-order model
distance.py   the glue distance of a stream type to a target
tables.py     `TaskTables`: per-task interning, typing and move options
targets.py    `TargetTables`: per-task targets, distances and the heuristic
searcher.py   `Search`: one best-first search (frontier, budget, noise)
emit.py       goal test, output assignments, program text, final check
portfolio.py  the portfolio: members, shares, interleaving, patience
proposer.py   `SearchProposer`, `search_programs`, `fit_prior`
"""

from stepforge.loop.search.config import SearchConfig
from stepforge.loop.search.proposer import SearchProposer, fit_prior, search_programs
from stepforge.loop.search.results import Candidate, SearchStats
from stepforge.loop.search.task import SearchTask, SearchTaskError

__all__ = [
    "Candidate",
    "SearchConfig",
    "SearchProposer",
    "SearchStats",
    "SearchTask",
    "SearchTaskError",
    "fit_prior",
    "search_programs",
]
