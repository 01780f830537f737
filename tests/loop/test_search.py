"""The search proposer (loop/search/): well-typed, affine, distinct, deterministic, budgeted, learns."""

from __future__ import annotations

import pickle
import time

import pytest

from stepforge.benchmark.schema import Task, load_benchmark
from stepforge.benchmark.verifier import verify
from stepforge.loop.interfaces import Demonstration, ProposalRequest
from stepforge.loop.search import SearchConfig, SearchProposer, SearchStats, fit_prior, search_programs
from stepforge.loop.search.portfolio import portfolio_members
from stepforge.loop.search.prior import OpPrior, program_tokens
from stepforge.loop.search.tables import TaskTables
from stepforge.loop.search.task import SearchTask, SearchTaskError
from stepforge.simulator import check_affine, parse_program
from stepforge.simulator.interpreter import typecheck_program

SCALE_SUM = """
test_name: scale_sum
inputs:
  - {name: E0, dtype: fp32, dims: [K, M], data_gen: torch.rand}
fns:
  - name: double
    func_name: fn_double
    input_dtype: fp32
    output_dtype: fp32
    apply: |
      [input[0] * 2]
  - name: add
    func_name: fn_add
    input_dtype: fp32
    output_dtype: fp32
    init: 0
    apply: |
      [state[0] + input[0]]
outputs:
  - name: S0
    dtype: fp32
    dims: [M]
    data_transform: |
      (2 * input_data['E0']).sum(-1)
"""

ROUTED = """
test_name: routed
global: |
  E_value = 2
  ctx[E] = E_value
inputs:
  - {name: E0, dtype: "Buffer(fp32, [D])", dims: [M], data_gen: torch.rand}
  - {name: E1, dtype: "Multihot(fp32, E)", dims: [M], data_gen: {min: 0, max: 2}}
fns:
  - name: expert_double
    func_name: fn_double
    input_dtype: "Buffer(fp32, [D])"
    output_dtype: "Buffer(fp32, [D])"
    apply: |
      [input[0] * 2]
  - name: expert_shift
    func_name: fn_shift
    input_dtype: "Buffer(fp32, [D])"
    output_dtype: "Buffer(fp32, [D])"
    apply: |
      [input[0] + 1]
  - name: sum
    func_name: fn_sum
    input_dtype: "Buffer(fp32, [D])"
    output_dtype: "Buffer(fp32, [D])"
    init: 0
    apply: |
      [state[0] + input[0]]
outputs:
  - name: S0
    dtype: "Buffer(fp32, [D])"
    dims: [M]
    data_transform: |
      x = input_data['E0']
      r = input_data['E1']
      r[..., 0:1] * (2 * x) + r[..., 1:2] * (x + 1)
"""

# two unary fns of equal types and a binary one: many well-typed programs
MANY = """
test_name: many
inputs:
  - {name: E0, dtype: fp32, dims: [D, N], data_gen: torch.rand}
fns:
  - {name: square, func_name: fn_square, input_dtype: fp32, output_dtype: fp32, apply: "[input[0] ** 2]"}
  - {name: half, func_name: fn_half, input_dtype: fp32, output_dtype: fp32, apply: "[input[0] / 2]"}
  - name: sub
    func_name: fn_sub
    input_dtype: [fp32, fp32]
    output_dtype: fp32
    apply: |
      [input[0] - input[1]]
outputs:
  - name: S0
    dtype: fp32
    dims: [D, N]
    data_transform: |
      x = input_data['E0']
      x ** 2 / 2 - x
"""

FAST = SearchConfig(max_expansions=3000, max_seconds=20.0)


@pytest.fixture(scope="module")
def bench() -> dict[str, Task]:
    return load_benchmark()


def _ir(task: Task) -> str:
    return task.to_yaml(include_impl=False)


def _static_ok(ir: str, text: str) -> None:
    spec = SearchTask.from_ir(ir)
    program = parse_program(text)
    typed = typecheck_program(program, dict(spec.inputs), spec.fns, spec.binding)
    assert typed.outputs == [st for _, st in spec.outputs], text
    assert check_affine(program) == [], text


@pytest.mark.parametrize("ir", [SCALE_SUM, ROUTED, MANY])
def test_every_emitted_program_parses_typechecks_and_is_affine(ir):
    stats = SearchStats()
    cands = list(search_programs(ir, n=25, temperature=0.7, seed=3, config=FAST, stats=stats))
    assert cands
    for c in cands:
        _static_ok(ir, c.text)
    assert stats.rejected == 0


def test_benchmark_candidates_are_well_typed(bench):
    for key in ("gemm/G_0_7_01", "norm/G_0_9_02", "moe-end-to-end/G_0_9_01", "attention/G_0_9_01"):
        ir = _ir(bench[key])
        stats = SearchStats()
        cands = list(search_programs(ir, n=8, config=FAST, stats=stats))
        assert cands, key
        for c in cands:
            _static_ok(ir, c.text)
        assert stats.rejected == 0


def test_n_distinct_programs_in_cost_order():
    cands = list(search_programs(MANY, n=12, config=FAST))
    assert len(cands) == 12 and len({c.text for c in cands}) == 12
    # one search (no portfolio) gives its programs in the prior's order at temperature 0
    cands = list(search_programs(MANY, n=12, config=FAST.model_copy(update={"heuristic_weights": [2.0]})))
    assert len(cands) == 12
    assert len({c.text for c in cands}) == 12
    costs = [c.cost for c in cands]
    assert costs == sorted(costs)  # temperature 0: the prior's order


def test_deterministic_for_a_seed_and_varied_across_seeds_and_temperatures():
    def texts(seed, temperature):
        return [c.text for c in search_programs(MANY, n=10, temperature=temperature, seed=seed, config=FAST)]

    assert texts(7, 1.0) == texts(7, 1.0)
    assert texts(0, 0.0) == texts(5, 0.0)  # no noise at temperature 0
    variants = {tuple(texts(s, 1.0)) for s in range(4)} | {tuple(texts(0, 0.0))}
    assert len(variants) >= 3
    assert texts(1, 0.4) != texts(1, 2.0)


def test_routing_idiom_is_emitted_and_correct():
    task = Task.from_yaml(ROUTED)
    for c in search_programs(ROUTED, n=5, config=FAST):
        assert "step.Partition(N=E_value)" in c.text and "step.Merge(fn=fn_sum)" in c.text
        assert "for p, f in zip(" in c.text
    first = next(search_programs(ROUTED, n=1, config=FAST))
    assert verify(task, first.text).passed, first.text


def _first_correct(task: Task, demos=(), n=60, config=FAST):
    stats = SearchStats()
    for i, c in enumerate(search_programs(_ir(task), demonstrations=demos, n=n, config=config, stats=stats)):
        if verify(task, c.text).passed:
            return c, i + 1
    return None, n


@pytest.mark.parametrize("key", ["gemm/G_0_6_02", "rope/G_0_3_02", "attention/G_0_4_01", "moe-expert/G_0_6_05",
                                 "bmm/bmm_0"])
def test_solves_easy_benchmark_tasks_cold(bench, key):
    cand, tried = _first_correct(bench[key])
    assert cand is not None, f"{key}: no correct program in {tried} candidates"


def test_solves_a_small_task_cold():
    task = Task.from_yaml(SCALE_SUM)
    cand, _ = _first_correct(task)
    assert cand is not None
    assert "Accum(fn=fn_add, b=1)" in cand.text


def test_demonstrations_reduce_expansions_to_the_first_correct_program(bench):
    # bmm_2 broadcasts both operands; bmm_1 (another bmm task) shows the Bufferize/Repeat/Streamify shape
    target = bench["bmm/bmm_2"]
    demos = [Demonstration(task_key=k, task=bench[k], impl=bench[k].impl) for k in ("bmm/bmm_1", "bmm/bmm_0")]
    cfg = SearchConfig(max_expansions=8000, max_seconds=60.0)
    cold, _ = _first_correct(target, n=150, config=cfg)
    warm, _ = _first_correct(target, demos=demos, n=150, config=cfg)
    assert cold is not None and warm is not None
    assert warm.expansions < cold.expansions, (cold.expansions, warm.expansions)


def test_budget_is_honoured(bench):
    ir = _ir(bench["norm/G_0_16_01"])  # far beyond a tiny budget
    one = SearchConfig(max_expansions=40, max_seconds=30.0, heuristic_weights=[2.0])
    stats = SearchStats()
    assert list(search_programs(ir, n=3, config=one, stats=stats)) == []
    assert stats.expansions == 40 and stats.stopped == "expansions"
    # a portfolio of two searches: the budget holds for each of them
    stats = SearchStats()
    two = SearchConfig(max_expansions=40, max_seconds=30.0, heuristic_weights=[2.0, 4.0])
    assert list(search_programs(ir, n=3, config=two, stats=stats)) == []
    assert stats.expansions == 80 and stats.stopped == "expansions"
    stats = SearchStats()
    t0 = time.perf_counter()
    timed = SearchConfig(max_expansions=10**9, max_seconds=0.5, heuristic_weights=[2.0])
    assert list(search_programs(ir, n=3, config=timed, stats=stats)) == []
    assert stats.stopped == "seconds"
    assert time.perf_counter() - t0 < 2.0


def test_proposer_contract_pickle_and_config():
    proposer = SearchProposer({"max_expansions": 2000})
    assert proposer.config.max_expansions == 2000
    clone = pickle.loads(pickle.dumps(proposer))
    assert clone.config == proposer.config
    reqs = [ProposalRequest(task_key="many", task=Task.from_yaml(MANY), n=4, temperature=0.7, seed=1),
            ProposalRequest(task_key="scale_sum", task=Task.from_yaml(SCALE_SUM), n=2)]
    out = clone.propose(reqs)
    assert [len(x) for x in out] == [4, 2]
    for props, req in zip(out, reqs):
        assert len({p.raw for p in props}) == len(props)
        for p in props:
            _static_ok(req.task_ir, p.raw)
            assert p.prompt_tokens == 0 and p.completion_tokens == 0 and p.messages is None and p.seconds >= 0
    again = SearchProposer({"max_expansions": 2000}).propose(reqs)
    assert [[p.raw for p in x] for x in out] == [[p.raw for p in x] for x in again]

    class LoopProposerConfig:  # the loop hands its proposer config, whose `options` hold these keys
        options = {"max_seconds": 5.0}

    assert SearchProposer(LoopProposerConfig()).config.max_seconds == 5.0
    with pytest.raises(ValueError):  # pydantic ValidationError
        SearchProposer({"max_expansion": 1})  # a typo is an error, not a silent default


def test_budget_schedules_give_later_rounds_more_expansions_and_candidates(bench):
    task = bench["norm/G_0_16_01"]  # beyond every budget here: each request spends its whole budget
    proposer = SearchProposer({"max_expansions": 999, "expansion_schedule": [30, 60, 90], "heuristic_weights": [2.0]})
    spent = []
    for round_ in (0, 1, 2, 5):
        stats = SearchStats()
        request = ProposalRequest(task_key=task.key, task=task, n=2, round=round_)
        assert list(proposer.iter_proposals(request, stats)) == []
        spent.append((stats.expansions, stats.stopped))
    assert spent == [(30, "expansions"), (60, "expansions"), (90, "expansions"), (90, "expansions")]
    assert SearchConfig(max_expansions=7).for_round(3).max_expansions == 7  # no schedule: max_expansions
    many = SearchProposer({"max_expansions": 2000, "candidate_schedule": [2, 5]})
    counts = [len(list(many.iter_proposals(ProposalRequest(task_key="many", task=Task.from_yaml(MANY), n=4,
                                                           round=r)))) for r in (0, 1, 3)]
    assert counts == [2, 4, 4]  # the schedule's count, never more than the request's n
    with pytest.raises(ValueError):
        SearchConfig(expansion_schedule=[10, 0])


def test_iter_proposals_is_propose_one_at_a_time_and_lazy():
    proposer = SearchProposer({"max_expansions": 2000})
    request = ProposalRequest(task_key="many", task=Task.from_yaml(MANY), n=5, temperature=0.4, seed=3)
    whole = [p.raw for p in proposer.propose([request])[0]]
    stats = SearchStats()
    stream = proposer.iter_proposals(request, stats)
    first = next(stream)
    assert first.raw == whole[0] and stats.candidates == 1  # no work beyond the first program yet
    assert [first.raw] + [p.raw for p in stream] == whole


def test_bad_task_ir_is_reported():
    with pytest.raises(SearchTaskError, match="inputs"):
        SearchTask.from_ir("test_name: x\nfns: []\n")
    with pytest.raises(SearchTaskError, match=r"fns\[0\]"):
        SearchTask.from_ir(SCALE_SUM.replace("input_dtype: fp32\n    output_dtype: fp32\n    apply: |\n      [input[0] * 2]",
                                             "input_dtype: Bufer(fp32)\n    output_dtype: fp32\n    apply: |\n      [input[0] * 2]"))


def test_prior_learns_from_demonstrations():
    impl = ("a = step.Bufferize(a=1).apply(E0)\nb = step.Repeat(n=M).apply(a)\nc = step.Streamify().apply(b)\n"
            "d = step.Map(fn=f).apply((c, E1))\nreturn d\n")
    assert program_tokens(parse_program(impl)) == ["Bufferize(a=1)", "Repeat", "Streamify", "Zip", "Map"]
    base = OpPrior()
    fitted = base.fit([(impl, None)] * 3)
    ctx = ("Bufferize(a=1)", "Repeat")
    assert fitted.prob("Streamify", ctx) > base.prob("Streamify", ctx)
    # the mixture with the base prior keeps unseen tokens from vanishing
    assert fitted.prob("Flatten(L=[1])", ctx) >= fitted.mix * base.prob("Flatten(L=[1])", ctx)
    assert fitted.fit([]).prob("Streamify", ctx) == fitted.prob("Streamify", ctx)
    assert pickle.loads(pickle.dumps(fitted)).prob("Streamify", ctx) == fitted.prob("Streamify", ctx)


def test_portfolio_members_share_one_task_tables():
    demo = next(search_programs(MANY, n=1, config=FAST)).text
    prior = fit_prior([(demo, MANY)], FAST, MANY)
    tables = TaskTables(SearchTask.from_ir(MANY), FAST)
    members = portfolio_members(tables, prior, FAST, n=4, temperature=0.0, seed=0)
    # the learned prior at every weight, the base prior at the first weight with `base_share` of the samples
    assert [(m.weight, m.prior is prior) for m, _ in members] == [(2.0, True), (4.0, True), (2.0, False)]
    assert [share for _, share in members] == pytest.approx([0.375, 0.375, 0.25])
    assert all(m.tables is tables for m, _ in members)
    assert next(members[0][0].run()).text == demo  # the learned prior's first program is the demonstration


def test_open_mode_search_writes_candidates_from_its_generated_library():
    """Open mode: candidates over the generated fn library (its bodies in the fn language); some verify."""
    from stepforge.benchmark.open_mode import verify_open
    from stepforge.loop.agents.knowledge import load_knowledge
    from stepforge.loop.candidates import parse_candidate
    from stepforge.loop.interfaces import ProposalRequest
    from stepforge.loop.search.open_library import fn_library
    from stepforge.loop.search.proposer import SearchProposer

    examples = load_knowledge().example_map
    for name in ("kb_scan", "kb_zip"):
        task = examples[name].task
        library = {f.func_name: f for f in fn_library(task)}
        own = {f.func_name for f in task.fns}
        out = SearchProposer().propose([ProposalRequest(task_key=name, task=task, n=8, temperature=0.4,
                                                        mode="open")])[0]
        assert len(out) == 8
        stages = []
        for p in out:
            cand = parse_candidate(p.raw)
            assert cand is not None and cand.fns and all(library[f.func_name] == f for f in cand.fns)
            assert not own & {f.func_name for f in cand.fns}  # never the task file's fns
            stages.append(verify_open(task, cand, seeds=(0,)).stage)
        assert "ok" in stages and "fns" not in stages, (name, stages)
