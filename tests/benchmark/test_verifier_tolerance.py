"""The float32 tolerance: correct programs pass at large sizes, small real errors fail, bindings catch size-specific code."""

from __future__ import annotations

import math

import pytest
import torch

from stepforge.benchmark.schema import Tolerance, load_benchmark
from stepforge.benchmark.verifier import EPS32, tolerance_for, verify

TASKS = load_benchmark()

LARGE = {
    "gemm/G_0_6_02": {"K": 512, "M": 3, "N": 4},
    "gemm/G_0_7_01": {"K": 512, "M": 3, "N": 4},
    "bmm/bmm_1": {"K": 512, "M": 2, "N": 3, "D": 4},
    "bmm/bmm_2": {"K": 512, "M": 2, "N": 3, "D": 4},
    "attention/G_0_4_01": {"M": 512, "N": 3, "D": 8},
    "attention/G_0_9_01": {"M": 512, "N": 3, "D": 8},
    "norm/G_0_8_01": {"D": 512, "N": 4},
    "norm/G_0_16_01": {"D": 512, "N": 4},
    "rope/G_0_3_03": {"N": 300, "M": 2, "D": 128},
}


def with_fn(task, func_name: str, apply: str):
    fns = [f.model_copy(update={"apply": apply}) if f.func_name == func_name else f for f in task.fns]
    assert fns != task.fns
    return task.model_copy(update={"fns": fns})


def with_oracle(task, block: str):
    outputs = [task.outputs[0].model_copy(update={"data_transform": block})] + list(task.outputs[1:])
    return task.model_copy(update={"outputs": outputs})


@pytest.mark.parametrize("key", list(LARGE))
def test_correct_program_passes_at_long_reductions(key):
    verdict = verify(TASKS[key], bindings=[LARGE[key]], seeds=(0, 1))
    assert verdict.passed, verdict.message


# A perturbation of 1e-3 relative, put where each task computes its last step.
PERTURBED = {
    "gemm/G_0_6_02": ("fn_mul", "return [input[0] * input[1] * (1 + 1e-3)]\n"),
    "bmm/bmm_2": ("fn_mul", "return [input[0] * input[1] * (1 + 1e-3)]\n"),
    "attention/G_0_4_01": ("fn_take_output", "return [input[2] * (1 + 1e-3)]\n"),
    "norm/G_0_8_01": ("fn_divide", "return [input[0] / input[1] * (1 + 1e-3)]\n"),
}


@pytest.mark.parametrize("key", list(PERTURBED))
@pytest.mark.parametrize("large", [False, True])
def test_relative_perturbation_of_1e_3_fails_at_small_and_large_sizes(key, large):
    task = with_fn(TASKS[key], *PERTURBED[key])
    bindings = [LARGE[key]] if large else [{}]
    verdict = verify(task, task.impl, bindings=bindings, seeds=(0,))
    assert verdict.stage == "value" and not verdict.passed, verdict.message


def test_oracle_off_by_1e_3_relative_is_caught():
    task = TASKS["gemm/G_0_6_02"]
    block = task.outputs[0].transforms()[0].rstrip("\n").splitlines()
    scaled = "\n".join(block[:-1] + [f"({block[-1]}) * (1 + 1e-3)"]) + "\n"
    verdict = verify(with_oracle(task, scaled), task.impl, bindings=[LARGE["gemm/G_0_6_02"]], seeds=(0,))
    assert verdict.stage == "value"


def test_one_wrong_element_is_found_and_located():
    task = TASKS["norm/G_0_8_01"]
    block = task.outputs[0].transforms()[0].rstrip("\n").splitlines()
    # the expected tensor (N, D) with element (n=2, d=5) moved by 1e-3 of the largest value
    body = block[:-1] + [f"expected = {block[-1]}", "expected[2, 5] += 1e-3 * expected.abs().max()", "expected"]
    verdict = verify(with_oracle(task, "\n".join(body) + "\n"), task.impl, seeds=(0,))
    assert verdict.stage == "value"
    assert "1 of 112 values" in verdict.message and "(N=2, D=5)" in verdict.message


def test_nan_output_fails():
    task = with_fn(TASKS["norm/G_0_8_01"], "fn_divide", "return [input[0] / input[1] * float('nan')]\n")
    verdict = verify(task, task.impl, bindings=[{}], seeds=(0,))
    assert verdict.stage == "value" and "got nan" in verdict.message


def test_size_bindings_catch_a_program_only_right_at_the_defaults():
    # fn_div_d written with the literal 16 instead of D_value: right only where D = 16
    task = with_fn(TASKS["norm/G_0_16_01"], "fn_div_d", "return [input[0] / 16]\n")
    assert verify(task, task.impl, bindings=[{}]).passed
    verdict = verify(task, task.impl)
    assert verdict.stage == "value"
    assert verdict.binding is not None and verdict.binding["D"] != 16
    assert f"D={verdict.binding['D']}" in verdict.message


def test_tolerance_grows_with_sqrt_of_the_largest_size_and_scales_with_magnitude():
    ref = torch.tensor([1.0, -4.0, 0.5], dtype=torch.float64)
    rtol16, atol16 = tolerance_for({"M": 5, "N": 7, "K": 9, "D": 16}, ref)
    rtol64, atol64 = tolerance_for({"M": 5, "N": 7, "K": 9, "D": 64}, ref)
    assert rtol16 == pytest.approx(8 * EPS32 * 4)
    assert rtol64 == pytest.approx(2 * rtol16)
    assert atol16 == pytest.approx(rtol16 * 4.0)  # relative to the field's largest magnitude
    _, atol_dev = tolerance_for({"D": 16}, ref, dev32=1e-4)
    assert atol_dev == pytest.approx(atol16 + 4e-4)
    rtol, atol = tolerance_for({"D": 16}, ref, override=Tolerance(rtol=0.1))
    assert rtol == 0.1 and atol == pytest.approx(atol16)
    # the margins the docstring promises at the defaults
    assert 1e-3 / (2 * rtol16) > 100
    assert math.isclose(rtol16, 3.8e-6, rel_tol=0.01)


def test_task_tolerance_override_loosens_the_check():
    key = "gemm/G_0_6_02"
    task = with_fn(TASKS[key], *PERTURBED[key])
    loose = task.model_copy(update={"tolerance": Tolerance(rtol=1e-2, atol=0.0)})
    assert verify(loose, loose.impl, bindings=[{}], seeds=(0,)).passed
