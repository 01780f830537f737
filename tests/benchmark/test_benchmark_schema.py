"""Task files: loading, the benchmark's keys and order, the YAML round trip, and errors that name file and key."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from support import PUBLISHED_GROUPS, added_task_keys

from stepforge.benchmark.schema import (
    GROUP_ORDER,
    Task,
    TaskFileError,
    load_benchmark,
    load_task,
    resolve_task,
)
from stepforge.benchmark.verifier import verify

BENCHMARK_IDS = {
    "attention": {"G_0_4_01", "G_0_6_01", "G_0_9_01"},
    "bmm": {"bmm_0", "bmm_1", "bmm_2"},
    "gemm": {"G_0_7_01", "G_0_6_03", "G_0_6_02"},
    "norm": {"G_0_9_02", "G_0_16_01", "G_0_8_01"},
    "rope": {"G_0_3_02", "G_0_3_03", "G_0_4_01"},
    "moe-index": {"G_0_3_03", "G_0_13_02", "G_0_7_03", "G_0_3_04"},
    "moe-expert": {"G_0_7_01", "G_0_6_05", "G_0_5_02"},
    "moe-end-to-end": {"G_0_9_01", "G_0_9_02", "G_0_12_01", "G_0_10"},
}
TASKS = load_benchmark()


def test_benchmark_has_the_26_tasks_of_benchmark_md_keyed_by_group_and_id():
    expected = {f"{g}/{i}" for g, ids in BENCHMARK_IDS.items() for i in ids}
    published = {key for key, task in TASKS.items() if task.group in BENCHMARK_IDS}
    assert published == expected
    assert len(published) == 26
    for key, task in TASKS.items():
        assert key == f"{task.group}/{task.test_name}"


def test_added_tasks_live_in_their_own_groups_listed_in_the_group_order():
    added = added_task_keys(TASKS)
    assert len(added) >= 30
    groups = {TASKS[key].group for key in added}
    assert len(groups) >= 6
    assert groups.isdisjoint(BENCHMARK_IDS) and groups <= set(GROUP_ORDER)
    assert tuple(GROUP_ORDER[:len(PUBLISHED_GROUPS)]) == PUBLISHED_GROUPS == tuple(BENCHMARK_IDS)


def test_benchmark_order_is_stable_and_follows_the_group_order():
    again = load_benchmark()
    assert list(again) == list(TASKS)
    groups = [t.group for t in TASKS.values()]
    ranks = [GROUP_ORDER.index(g) for g in groups]
    assert ranks == sorted(ranks)
    for g in GROUP_ORDER:
        names = [t.test_name for t in TASKS.values() if t.group == g]
        assert names == sorted(names)


@pytest.mark.parametrize("key", list(TASKS))
def test_yaml_round_trip_gives_an_equal_task(key):
    task = TASKS[key]
    text = task.to_yaml(include_impl=True)
    again = Task.from_yaml(text)
    assert again == task
    assert again.to_yaml() == text
    # the prompt form: no impl, everything else identical, code as literal blocks
    prompt = task.to_yaml(include_impl=False)
    assert "impl:" not in prompt
    assert "    apply: |" in prompt
    assert Task.from_yaml(prompt) == task.without_impl()
    bare = Task.from_yaml(task.to_yaml(include_impl=False, include_meta=False))
    assert bare.group is None and bare.bindings == [] and bare.description is None
    assert bare.fns == task.fns and bare.outputs == task.outputs


def test_round_trip_keeps_awkward_code_exact():
    task = TASKS["norm/G_0_8_01"]
    tricky = "x = input[0]\ns = 'tab\\there \"quoted\"'  # backslash and quotes\nreturn [x * 2]\n"
    fns = [f.model_copy(update={"apply": tricky}) if f.func_name == "fn_square" else f for f in task.fns]
    variant = task.model_copy(update={"fns": fns, "description": "line one\nline two: with colon"})
    again = Task.from_yaml(variant.to_yaml())
    assert again.fn_by_func_name("fn_square").apply == tricky
    assert again == variant


# -- a file written by someone else, with only the spec's keys ---------------------------------

SPEC_ONLY = """\
test_name: my_rms
inputs:
- name: E0
  dtype: fp32
  dims: [D, N]
  data_gen: torch.rand
fns:
- name: sq
  func_name: square
  input_dtype: fp32
  output_dtype: fp32
  apply: "[input[0] ** 2]"
- name: sq
  func_name: mean_fold
  input_dtype: fp32
  output_dtype: fp32
  init: 0
  apply: |
      return [state[0] + input[0] / D_value]
- name: finish
  func_name: finish
  input_dtype: [fp32, fp32]
  output_dtype: fp32
  apply: |
      x, ms = input
      x / torch.sqrt(ms + eps)
global: |
  eps = 1e-5
outputs:
- name: S0
  dtype: fp32
  dims: [D, N]
  data_transform: |
    x = input_data['E0']
    x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
impl: |
  a, b = step.Copy().apply(E0)
  s = step.Map(fn=square).apply(a)
  m = step.Accum(fn=mean_fold, b=1).apply(s)
  r = step.Repeat(n=D).apply(m)
  S0 = step.Map(fn=finish).apply((b, r))
  return S0
"""


def test_a_spec_only_file_loads_and_verifies_unchanged(tmp_path):
    path = tmp_path / "my_rms.yaml"
    path.write_text(SPEC_ONLY)
    task = load_task(path)
    assert task.group is None and task.key == "my_rms"
    assert [f.name for f in task.fns] == ["sq", "sq", "finish"]  # names may repeat; func_name may not
    assert task.fn_by_func_name("mean_fold").init == 0
    verdict = verify(task, bindings=[{}, {"D": 8, "N": 3}])
    assert verdict.passed, verdict.message
    assert resolve_task(str(path)) == task


def test_multihot_data_gen_and_bare_inf_init_load():
    data = yaml.safe_load(SPEC_ONLY)
    data["inputs"].append({"name": "E1", "dtype": "Multihot(fp32, E)", "dims": ["N"], "data_gen": {"min": 1, "max": 2}})
    data["fns"][1]["init"] = "-inf"
    data["fns"][2]["init"] = -math.inf
    data["global"] = "E_value = 3\nctx[E] = E_value\n"
    task = Task.model_validate(data)
    assert task.inputs[1].data_gen.min == 1 and task.inputs[1].data_gen.max == 2
    assert Task.from_yaml(task.to_yaml()) == task


# -- malformed files ----------------------------------------------------------------------------


def _base() -> dict:
    return yaml.safe_load(TASKS["norm/G_0_8_01"].to_yaml())


def _set(path: list, value):
    def mutate(data):
        node = data
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(data):
        node = data
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return mutate


MALFORMED = {
    "bad init value": (_set(["fns", 2, "init"], "zero"), "fns[2].init", "0, 1, -1, -inf"),
    "init count": (_set(["fns", 2, "init"], [0, 0]), "fns[2].init", "output_dtype has 1"),
    "bad dtype": (_set(["inputs", 0, "dtype"], "Bufer(fp32, [D])"), "inputs[0].dtype", "expected fp32"),
    "dtype not text": (_set(["outputs", 0, "dtype"], 3), "outputs[0].dtype", "dtype string"),
    "missing oracle": (_delete(["outputs", 0, "data_transform"]), "outputs[0].data_transform", "required key is missing"),
    "missing fns": (_delete(["fns"]), "fns", "required key is missing"),
    "unknown top key": (_set(["fn"], []), "fn", "unknown key 'fn'"),
    "unknown fn key": (_set(["fns", 1, "body"], "x"), "fns[1].body", "unknown key 'body'"),
    "bad dim": (_set(["inputs", 0, "dims"], ["D", "N+1"]), "inputs[0].dims", "item 1"),
    "empty dims": (_set(["outputs", 0, "dims"], []), "outputs[0].dims", "non-empty list"),
    "bad data_gen": (_set(["inputs", 0, "data_gen"], "torch.randint"), "inputs[0].data_gen", "torch.randn"),
    "multihot gen on fp32": (_set(["inputs", 0, "data_gen"], {"min": 0, "max": 1}), "inputs[0].data_gen", "Multihot"),
    "multihot gen order": (_set(["inputs", 0, "data_gen"], {"min": 2, "max": 1}), "inputs[0].data_gen", "min <= max"),
    "oracle field count": (_set(["outputs", 0, "data_transform"], ["x", "x"]), "outputs[0].data_transform",
                           "dtype has 1 field"),
    "input and parameter clash": (_set(["parameters"], [{"name": "E0", "dims": ["D"], "data_gen": "torch.rand"}]),
                                  "parameters", "also name inputs"),
    "apply syntax": (_set(["fns", 0, "apply"], "return [input[0] *]\n"), "fns[0].apply", "syntax error on line 1"),
    "apply without result": (_set(["fns", 0, "apply"], "y = input[0] * 2\n"), "fns[0].apply", "`return`"),
    "oracle without expression": (_set(["outputs", 0, "data_transform"], "x = 1\n"), "outputs[0].data_transform",
                                  "last line must be an expression"),
    "duplicate func_name": (_set(["fns", 1, "func_name"], "fn_square"), "fns[1].func_name", "repeats fns[0]"),
    "binding value": (_set(["bindings"], [{"D": "eight"}]), "bindings", "positive integer"),
    "binding not a map": (_set(["bindings"], [3]), "bindings", "item 0"),
    "global syntax": (_set(["global"], "E_value = = 3\n"), "global", "syntax error"),
    "tolerance key": (_set(["tolerance"], {"rtol": 0.1, "abs": 1}), "tolerance.abs", "unknown key 'abs'"),
    "inputs not a list": (_set(["inputs"], {"name": "E0"}), "inputs", "non-empty list"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_names_file_key_and_expectation(tmp_path, case):
    mutate, key, expected = MALFORMED[case]
    data = copy.deepcopy(_base())
    mutate(data)
    path = tmp_path / "G_0_8_01.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(TaskFileError) as info:
        load_task(path)
    err = info.value
    assert err.path == str(path)
    keys = [k for k, _ in err.errors]
    hit = [m for k, m in err.errors if k == key]
    assert hit, f"expected an error at {key}, got {keys}"
    assert expected in hit[0], hit[0]
    line = err.message
    assert line.startswith(f"{path}: ") and "Traceback" not in str(err)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("test_name: x\ninputs: [\n  - oops: {\n")
    with pytest.raises(TaskFileError) as info:
        load_task(path)
    assert info.value.key.startswith("line ")
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_top_level_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(TaskFileError, match="expected a mapping of task keys"):
        load_task(path)
    with pytest.raises(TaskFileError, match="cannot read the file"):
        load_task(tmp_path / "absent.yaml")


def _write_benchmark(root: Path, group: str, name: str, data: dict) -> Path:
    (root / group).mkdir(parents=True, exist_ok=True)
    path = root / group / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_load_benchmark_checks_group_folder_and_file_name(tmp_path):
    data = _base()
    _write_benchmark(tmp_path / "a", "norm", "G_0_8_01", data)
    tasks = load_benchmark(tmp_path / "a")
    assert list(tasks) == ["norm/G_0_8_01"]

    path = _write_benchmark(tmp_path / "b", "gemm", "G_0_8_01", data)  # group says norm
    with pytest.raises(TaskFileError) as info:
        load_benchmark(tmp_path / "b")
    assert info.value.path == str(path) and info.value.key == "group"

    path = _write_benchmark(tmp_path / "c", "norm", "other_name", data)
    with pytest.raises(TaskFileError) as info:
        load_benchmark(tmp_path / "c")
    assert info.value.key == "test_name" and "other_name" in info.value.expected

    no_group = dict(data)
    del no_group["group"]
    _write_benchmark(tmp_path / "d", "mine", "G_0_8_01", no_group)
    assert list(load_benchmark(tmp_path / "d")) == ["mine/G_0_8_01"]


def test_resolve_task_by_key_unique_id_and_ambiguity():
    assert resolve_task("norm/G_0_8_01").key == "norm/G_0_8_01"
    assert resolve_task("bmm_1").key == "bmm/bmm_1"
    with pytest.raises(KeyError, match="names 2 tasks"):
        resolve_task("G_0_4_01")  # attention and rope share the id
    with pytest.raises(KeyError, match="no task"):
        resolve_task("nope/nothing")


def test_fingerprint_ignores_impl_and_description_but_not_fns():
    task = TASKS["gemm/G_0_6_02"]
    assert task.without_impl().fingerprint() == task.fingerprint()
    assert task.model_copy(update={"description": "x"}).fingerprint() == task.fingerprint()
    fns = [f.model_copy(update={"apply": "return [input[0] + input[1]]\n"}) if f.func_name == "fn_mul" else f
           for f in task.fns]
    assert task.model_copy(update={"fns": fns}).fingerprint() != task.fingerprint()
