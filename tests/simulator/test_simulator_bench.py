"""scripts/bench_simulator.py: its built-in programs compute what they claim, in both
engines, and its output ends with the speedup line (timings themselves are not tested)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from program_gen import assert_same_streams

from stepforge.simulator import parse_program, run_program

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_simulator.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_simulator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_builtin_programs_match_torch(bench):
    sizes = {"M": 2, "N": 3, "K": 4, "D": 5}
    cases = bench.builtin_cases()
    assert [c.name for c in cases] == ["bmm", "layernorm", "attention", "experts"]
    for case in cases:
        inputs, fns, binding, input_data = case.build(sizes, 1)
        program = parse_program(case.text)
        vec = run_program(program, inputs, fns, dict(binding), engine="vectorised")
        nai = run_program(program, inputs, fns, dict(binding), engine="naive")
        assert_same_streams(vec, nai, rtol=1e-5, atol=1e-5, where=case.name)
        (ref,) = bench.builtin_reference(case.name, inputs, binding, input_data)
        assert vec[0].data.shape == ref.shape, case.name
        assert torch.allclose(vec[0].data, ref, rtol=1e-4, atol=1e-5), case.name
    # the experts' router leaves some positions without an expert and uses several for others
    idx = cases[3].build(sizes, 1)[0]["E1"].data.reshape(-1, 4).sum(1)
    assert (idx == 0).any() and (idx == 2).any()


def test_script_prints_the_speedup_line_last(bench, capsys, monkeypatch):
    monkeypatch.setitem(bench.SIZES, "large", {"M": 2, "N": 2, "K": 3, "D": 2})
    assert bench.main(["--builtin", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("programs: built-in representative set")
    assert sum(" ok" in line for line in lines) == 8  # 4 programs x 2 sizes, engines agree
    assert re.fullmatch(r"speedup \d+\.\dx at M=2 N=2 K=3 D=2 \(naive \d+\.\d{3}s, vectorised \d+\.\d{3}s\)", lines[-1])
    assert re.fullmatch(r"vectorised \d+\.\d{4}s, oracles \d+\.\d{4}s at M=2 N=2 K=3 D=2 \(\d+\.\d\dx\)", lines[-2])
    replay = re.fullmatch(r"kernel replay: vectorised (\d+) kernels in \d+\.\d{4}s, oracles (\d+) kernels in "
                          r"\d+\.\d{4}s \(\d+\.\d\dx the oracles' time\)", lines[-3])
    assert replay and int(replay[1]) > int(replay[2]) > 0


def test_replayed_kernels_recompute_the_run(bench):
    """The replay floor does the run's own tensor work: replaying the recorded kernels gives the recorded results."""
    case = bench.builtin_cases()[2]  # attention: a Map, a Zip and an online-softmax Accum
    inputs, fns, binding, _ = case.build({"M": 2, "N": 3, "K": 4, "D": 5}, 0)
    program = parse_program(case.text)
    run_program(program, inputs, fns, dict(binding))  # warm, as replay_case does: fns try their layouts once
    results = []
    calls = bench.record_kernels(lambda: results.append(run_program(program, inputs, fns, dict(binding))))
    ops = {str(func) for func, *_ in calls}
    assert len(calls) >= 5 and any("exp" in op for op in ops) and not any("rand" in op for op in ops), ops
    again = bench.replay_kernels(calls)
    for (func, _, _, recorded), new in zip(calls, again):
        if isinstance(recorded, torch.Tensor) and recorded.is_floating_point():
            assert new is not recorded and torch.equal(recorded, new), func  # computed again, to the same values
    final = results[0][0].data
    assert any(isinstance(r, torch.Tensor) and r.shape == final.shape and torch.allclose(r, final) for *_, r in calls)


def test_device_option(bench, capsys, monkeypatch):
    monkeypatch.setitem(bench.SIZES, "default", {"M": 2, "N": 2, "K": 3, "D": 2})
    assert bench.main(["--builtin", "--repeats", "1", "--sizes", "default", "--only", "bmm", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and " ok" in out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--builtin", "--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err
