"""Differential tests: the vectorised engine against the naive element-by-element one
on random well-typed programs (tests/program_gen.py).

Stratified by operator: each of the 14 operators gets its own hypothesis run
in which every program contains it (40 programs each, 560 per suite run), plus
150 seeded programs; the generator's coverage of operators and features is
asserted separately. STEPFORGE_TEST_DEVICE=cuda runs both engines on the GPU
(scripts/gpu_check.sh does).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from program_gen import OPS, TEST_DEVICE, DataChooser, RandomChooser, assert_same_streams, generate, run_both

from stepforge.simulator import check_affine, parse_program, typecheck

EXAMPLES_PER_OP = 40
SEEN_OPS: Counter = Counter()
SEEN_FEATURES: Counter = Counter()


def check_program(g):
    fns = g.fns()
    program = parse_program(g.text)
    assert check_affine(program) == [], g.text
    types = typecheck(program, g.input_types, fns, g.binding)
    vec, nai = run_both(g.text, g.inputs, fns, g.binding)
    context = f"\n{g.text}\nbinding {g.binding}\nfns {g.fn_specs}"
    assert_same_streams(vec, nai, where=context)
    # the static types agree with what ran (route sizes are dynamic symbols, renamed per run)
    assert [str(t.elem) for t in types] == [str(s.type.elem) for s in vec], context
    assert [len(t.shape) for t in types] == [len(s.type.shape) for s in vec], context
    # both engines ran where $STEPFORGE_TEST_DEVICE says (cpu unless set)
    assert {t.device.type for s in vec + nai for t in s.field_tensors()} <= {TEST_DEVICE.split(":")[0]}, context
    return vec


@pytest.mark.parametrize("focus", OPS)
@settings(max_examples=EXAMPLES_PER_OP, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_engines_agree(focus, data):
    g = generate(DataChooser(data), focus=focus)
    assert g.ops[focus] >= 1
    check_program(g)
    SEEN_OPS.update(g.ops)
    SEEN_FEATURES.update(g.features)


REQUIRED_FEATURES = {
    "tuple_stream", "tuple_fn", "map_tuple_arg", "buffer_of_buffer", "branch", "index", "online", "max",
    "accum_b2", "scan_b2", "comprehension", "empty_route", "no_bit_position", "merge_empty_route",
    "merge_no_bit_-inf", "reassign", "derived_route", "nested_partition",
}


def test_generator_covers_every_operator_and_feature():
    ops, features = Counter(), Counter()
    for seed in range(300):
        g = generate(RandomChooser(seed))
        ops.update(g.ops)
        features.update(g.features)
    assert set(ops) == set(OPS), set(OPS) - set(ops)
    assert min(ops.values()) >= 10, ops
    assert REQUIRED_FEATURES <= set(features), REQUIRED_FEATURES - set(features)


def test_generated_programs_are_well_typed_and_run():
    # seeded programs outside hypothesis: the same properties, a different slice of the space
    for seed in range(150):
        check_program(generate(RandomChooser(10_000 + seed), focus=OPS[seed % len(OPS)]))


def test_property_run_covered_every_operator():
    # runs after the stratified property tests in file order; skipped if they were deselected
    if sum(SEEN_OPS.values()) == 0:
        pytest.skip("the property tests did not run in this session")
    assert set(SEEN_OPS) == set(OPS)
    assert {"empty_route", "no_bit_position", "branch", "index", "tuple_stream"} <= set(SEEN_FEATURES)
