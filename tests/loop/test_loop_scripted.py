"""A scripted proposer for the loop tests, and the checks that it is what the tests assume.

`ScriptedProposer(script)` answers a request from a table keyed by
(task key, demonstration keys shown, temperature): a list of replies, one
per sample. It is a pure function of the request, so a killed and resumed
run sees the same replies as an uninterrupted one. Unscripted requests get
`default` replies (a program that does not solve anything).

`benchmark_factory(cfg, tasks)` is the `proposer.factory` the resume test
runs in a `stepforge improve` subprocess (PYTHONPATH=tests): on real tasks it
answers with the reference impl for some samples (chosen by the request's
seed) and with a wrong program for the others, slowly enough (a short sleep
per request) that the test can kill the run in the middle of a round. An
open-mode request is answered in a ```yaml block with the task's own fns and
impl as a candidate (or that candidate with a wrong program).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Optional

from support import make_task

from stepforge.benchmark.open_mode import OpenCandidate, reference_candidate
from stepforge.benchmark.verdict import Verdict
from stepforge.loop.interfaces import Proposal, ProposalRequest, Proposer

WRONG = "x = step.Map(fn=nope).apply(E0)\nreturn x\n"


class ScriptedProposer(Proposer):
    """Replies chosen per (task, demonstrations, temperature); records every request it saw."""

    name = "scripted"

    def __init__(self, script: dict[tuple[str, tuple[str, ...], float], list[str]], default: str = "no",
                 tokens: int = 3):
        self.script = script
        self.default = default
        self.tokens = tokens
        self.requests: list[ProposalRequest] = []

    def replies(self, request: ProposalRequest) -> list[str]:
        demos = tuple(d.task_key for d in request.demonstrations)
        return list(self.script.get((request.task_key, demos, request.temperature), [self.default] * request.n))

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        self.requests.extend(requests)
        out = []
        for r in requests:
            out.append([Proposal(raw=text, messages=[{"role": "user", "content": f"{r.task_key}"}], prompt_tokens=5,
                                 completion_tokens=self.tokens, seconds=0.001) for text in self.replies(r)[: r.n]])
        return out


def ok_verify(task: str, program: str) -> Any:
    """A verifier for scripted runs: replies starting with `ok` are correct."""
    good = program.startswith("ok")
    return Verdict(passed=good, stage="ok" if good else "value", message="" if good else "wrong",
                           affine_ok=True, functional_ok=good, timings={"total": 0.0})


def _coin(seed: int, index: int, modulus: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big") % modulus


class BenchmarkScripted(Proposer):
    """On real tasks: the reference impl for about one sample in `every`, else a wrong program.

    Tasks in `needs_demos` are only answered correctly when the prompt shows
    at least one demonstration (so they are solved in a later round).
    """

    name = "scripted-benchmark"

    def __init__(self, impls: dict[str, str], every: int = 3, delay_s: float = 0.0,
                 needs_demos: Optional[set[str]] = None):
        self.impls = impls
        self.every = every
        self.delay_s = delay_s
        self.needs_demos = set(needs_demos or ())

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        out = []
        for r in requests:
            if self.delay_s:
                time.sleep(self.delay_s)
            allowed = r.task_key not in self.needs_demos or bool(r.demonstrations)
            props = []
            for i in range(r.n):
                good = allowed and _coin(r.seed, i, self.every) == 0
                text = self.impls[r.task_key] if good else WRONG
                if r.mode == "open":
                    text = OpenCandidate(fns=reference_candidate(r.task).fns, impl=text).to_yaml()
                fence = "yaml" if r.mode == "open" else "python"
                props.append(Proposal(raw=f"```{fence}\n{text}```\n", prompt_tokens=7,
                                      completion_tokens=len(text) // 4))
            out.append(props)
        return out


def benchmark_factory(cfg, tasks) -> Proposer:
    """`proposer.factory: test_loop_scripted:benchmark_factory` (options: every, delay_s, needs_demos)."""
    opts = dict(cfg.proposer.options)
    delay = float(os.environ.get("STEPFORGE_TEST_DELAY_S", opts.get("delay_s", 0.0)))
    return BenchmarkScripted({k: t.impl for k, t in tasks.items()}, every=int(opts.get("every", 3)), delay_s=delay,
                             needs_demos=set(opts.get("needs_demos", [])))


# ---------------------------------------------------------------------------
# the helpers behave as the other tests assume


def test_scripted_proposer_is_a_function_of_the_request():
    from stepforge.loop.interfaces import Demonstration

    p = ScriptedProposer({("A", ("B",), 0.4): ["ok", "no"]})
    demo = Demonstration(task_key="B", task=make_task("B"), impl="ok")
    req = ProposalRequest(task_key="A", task=make_task("A"), demonstrations=[demo], n=2, temperature=0.4)
    assert [x.raw for x in p.propose([req])[0]] == ["ok", "no"]
    assert [x.raw for x in p.propose([req.model_copy(update={"demonstrations": []})])[0]] == ["no", "no"]


def test_benchmark_scripted_depends_on_seed_only():
    p = BenchmarkScripted({"t": "return E0\n"}, every=2)
    a = [x.raw for x in p.propose([ProposalRequest(task_key="t", task=make_task("t"), n=8, seed=5)])[0]]
    b = [x.raw for x in p.propose([ProposalRequest(task_key="t", task=make_task("t"), n=8, seed=5)])[0]]
    c = [x.raw for x in p.propose([ProposalRequest(task_key="t", task=make_task("t"), n=8, seed=6)])[0]]
    assert a == b and a != c
