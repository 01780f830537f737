"""Task files: the published benchmark's forms load and verify unchanged, and loose files are rejected
where they enter, naming the file, the key and the expectation."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from stepforge.benchmark.schema import TASKS_ROOT, TaskFileError, load_benchmark, load_task
from stepforge.benchmark.verifier import verify

TASKS = load_benchmark()


def _raw(key: str) -> dict:
    return yaml.safe_load((TASKS_ROOT / f"{key}.yaml").read_text())


def _write(tmp_path, data: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(path) -> TaskFileError:
    with pytest.raises(TaskFileError) as info:
        load_task(path)
    assert info.value.path == str(path)
    return info.value


def _hit(err: TaskFileError, key: str) -> str:
    found = [m for k, m in err.errors if k == key]
    assert found, f"expected an error at {key}, got {err.errors}"
    return found[0]


# -- the published forms -----------------------------------------------------------------------


def _published_multihot(data: dict) -> dict:
    """Every `data_gen: {min, max}` moved onto its input as `min` and `max` (the published files' form)."""
    data = copy.deepcopy(data)
    for decl in data["inputs"] + data.get("parameters", []):
        gen = decl.get("data_gen")
        if isinstance(gen, dict):
            del decl["data_gen"]
            decl["min"], decl["max"] = gen["min"], gen["max"]
    return data


MULTIHOT_TASKS = [k for k, t in TASKS.items() if any(not isinstance(d.data_gen, str) for d in t.inputs)]


def test_some_benchmark_tasks_have_multihot_inputs():
    assert len(MULTIHOT_TASKS) >= 2


@pytest.mark.parametrize("key", MULTIHOT_TASKS)
def test_min_max_on_the_multihot_input_loads_and_verifies_unchanged(tmp_path, key):
    data = _published_multihot(_raw(key))
    assert "min" in yaml.safe_dump(data) and "data_gen: {" not in yaml.safe_dump(data)
    task = load_task(_write(tmp_path, data, key.split("/")[1]))
    assert task == TASKS[key]
    verdict = verify(task, seeds=(0, 1))
    assert verdict.passed, verdict.message
    assert verdict.model_dump(exclude={"timings"}) == verify(TASKS[key], seeds=(0, 1)).model_dump(exclude={"timings"})


@pytest.mark.parametrize("change,key,fragment", [
    (lambda d: d.update(data_gen={"min": 0, "max": 1}), "min", "not both"),
    (lambda d: d.pop("max"), "max", "required key is missing"),
    (lambda d: d.pop("min"), "min", "required key is missing"),
    (lambda d: d.update(min=3, max=1), "data_gen", "min <= max"),
    (lambda d: d.update(min=-1), "data_gen.min", "non-negative"),
    (lambda d: d.update(max="three"), "data_gen.max", "non-negative"),
    (lambda d: d.update(dtype="fp32"), "data_gen", "Multihot"),
])
def test_bad_min_max_on_the_input_names_the_key(tmp_path, change, key, fragment):
    data = _published_multihot(_raw("moe-expert/G_0_6_05"))
    index = next(i for i, d in enumerate(data["inputs"]) if "min" in d)
    change(data["inputs"][index])
    message = _hit(_error(_write(tmp_path, data, "G_0_6_05")), f"inputs[{index}].{key}")
    assert fragment in message, message


def test_a_later_oracle_block_uses_a_name_an_earlier_block_defined(tmp_path):
    data = _raw("moe-index/G_0_3_03")  # S0's block computes `affinity`; S1 is that affinity
    assert "affinity =" in data["outputs"][0]["data_transform"][0]
    data["outputs"][1]["data_transform"] = ["affinity\n"]
    task = load_task(_write(tmp_path, data, "G_0_3_03"))
    verdict = verify(task, seeds=(0, 1))
    assert verdict.passed, verdict.message


def test_oracle_blocks_share_functions_and_run_in_order(tmp_path):
    data = _raw("moe-index/G_0_3_03")
    data["outputs"][0]["data_transform"] = [(
        "def gate(x):\n    return softmax(x @ input_data['Wg'])\n"
        "affinity = gate(input_data['E0'])\n"
        "torch.nn.functional.one_hot(affinity.argmax(dim=-1), E_value).to(affinity.dtype)\n")]
    data["outputs"][1]["data_transform"] = ["gate(input_data['E0'])\n"]
    assert verify(load_task(_write(tmp_path, data, "G_0_3_03")), seeds=(0,)).passed


def test_an_earlier_block_cannot_see_a_later_one_and_the_error_names_file_output_and_block(tmp_path):
    data = _raw("moe-index/G_0_3_03")
    data["outputs"][0]["data_transform"] = ["torch.nn.functional.one_hot(later.argmax(dim=-1), E_value).to(later.dtype)\n"]
    data["outputs"][1]["data_transform"] = ["later = softmax(input_data['E0'] @ input_data['Wg'])\nlater\n"]
    path = _write(tmp_path, data, "G_0_3_03")
    with pytest.raises(TaskFileError) as info:
        verify(load_task(path), seeds=(0,))
    err = info.value
    assert err.path == str(path) and err.key == "outputs[0].data_transform[0]"
    assert "NameError" in err.expected and "later" in err.expected


def test_an_oracle_block_that_raises_names_file_output_and_block(tmp_path):
    data = _raw("moe-index/G_0_3_03")
    data["outputs"][1]["data_transform"] = ["affinity\n" + "raise RuntimeError('oracle bug')\n" + "affinity\n"]
    path = _write(tmp_path, data, "G_0_3_03")
    with pytest.raises(TaskFileError) as info:
        verify(load_task(path), seeds=(0,))
    assert info.value.path == str(path) and info.value.key == "outputs[1].data_transform[0]"
    assert "RuntimeError: oracle bug" in info.value.expected and str(path) in info.value.message


# -- looseness ---------------------------------------------------------------------------------

NORM = "norm/G_0_8_01"  # fns[2] is fn_add (a fold with init 0)


@pytest.mark.parametrize("init", [7, 2, 0.5, -2, "inf", "+inf", "7", "zero", float("inf"), float("nan"), True,
                                  [7], "1e400"])
def test_an_init_outside_0_1_minus1_minus_inf_is_rejected(tmp_path, init):
    data = _raw(NORM)
    data["fns"][2]["init"] = init
    assert "0, 1, -1, -inf" in _hit(_error(_write(tmp_path, data, "G_0_8_01")), "fns[2].init")


@pytest.mark.parametrize("init", [0, 1, -1, "-inf", -math.inf, 0.0, 1.0, -1.0, [0]])
def test_the_four_inits_load(init):
    data = _raw(NORM)
    data["fns"][2]["init"] = init
    from stepforge.benchmark.schema import task_from_dict

    assert task_from_dict(data).fns[2].init == init


@pytest.mark.parametrize("key,value", [
    (["fns", 0, "func_name"], "__class__"), (["fns", 0, "func_name"], "__init__"), (["fns", 0, "func_name"], "__x"),
    (["fns", 0, "func_name"], "1abc"), (["fns", 0, "func_name"], "fn-add"), (["fns", 0, "func_name"], "class"),
    (["fns", 0, "func_name"], "lambda"), (["fns", 0, "func_name"], "fn add"), (["fns", 0, "func_name"], ""),
    (["fns", 0, "func_name"], 3), (["fns", 1, "name"], "__globals__"), (["inputs", 0, "name"], "__builtins__"),
    (["outputs", 0, "name"], "None"),
])
def test_a_dunder_or_non_identifier_name_is_rejected(tmp_path, key, value):
    data = _raw(NORM)
    node = data
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    message = _hit(_error(_write(tmp_path, data, "G_0_8_01")), f"{key[0]}[{key[1]}].{key[2]}")
    assert "identifier" in message


@pytest.mark.parametrize("where,value,key", [
    ("inputs", ["D", "H"], "inputs[0].dims"),
    ("inputs", ["D*H", "N"], "inputs[0].dims"),
    ("inputs", ["D/Q", "N"], "inputs[0].dims"),
    ("outputs", ["D", "E"], "outputs[0].dims"),  # E is no default: global must set it
    ("fn_dtype", "Buffer(fp32, [H])", "fns[0].input_dtype"),
    ("input_dtype", "Multihot(fp32, R)", "inputs[0].dtype"),
])
def test_dims_or_dtypes_naming_an_undefined_size_symbol_are_rejected(tmp_path, where, value, key):
    data = _raw(NORM)
    if where in ("inputs", "outputs"):
        data[where][0]["dims"] = value
    elif where == "fn_dtype":
        data["fns"][0]["input_dtype"] = value
    else:
        data["inputs"][0]["dtype"] = value
    message = _hit(_error(_write(tmp_path, data, "G_0_8_01")), key)
    assert "is not defined" in message and "ctx[" in message


@pytest.mark.parametrize("global_code", ["H_value = 4\nctx[H] = H_value\n", "ctx['H'] = 4\n", "ctx.update(H=4)\n"])
def test_a_symbol_that_global_sets_is_defined(global_code):
    from stepforge.benchmark.schema import task_from_dict

    data = _raw(NORM)
    data["global"] = global_code
    data["parameters"] = [{"name": "W", "dims": ["H", "D"], "data_gen": "torch.rand"}]
    assert task_from_dict(data).parameters[0].dims == ["H", "D"]


@pytest.mark.parametrize("oracle,what", [
    ("x = input_data['E0']\nx * float('nan')\n", "nan"),
    ("x = input_data['E0']\nx / torch.zeros_like(x)\n", "inf"),
    ("x = input_data['E0'].clone()\nx[0, 3] = -float('inf')\nx\n", "-inf"),
    ("x = input_data['E0'] - 0.5\nx.log()\n", "nan"),
])
def test_an_oracle_returning_nan_or_inf_is_a_broken_task(tmp_path, oracle, what):
    data = _raw(NORM)
    data["outputs"][0]["data_transform"] = oracle
    path = _write(tmp_path, data, "G_0_8_01")
    with pytest.raises(TaskFileError) as info:
        verify(load_task(path), seeds=(0,))
    err = info.value
    assert err.path == str(path) and err.key == "outputs[0].data_transform[0]"
    assert "NaN or infinite" in err.expected and "expected finite values" in err.expected
    assert what in err.expected


HUGE = int("f" * 2000, 16)  # what YAML's 0xfff... reads to: past Python's decimal digit limit


@pytest.mark.parametrize("change,key", [
    (lambda d: d["inputs"][0].update(dims=["D", HUGE]), "inputs[0].dims"),
    (lambda d: d["outputs"][0].update(dims=[2**31 + 1, "N"]), "outputs[0].dims"),
    (lambda d: d.update(bindings=[{"D": HUGE}]), "bindings"),
])
def test_huge_integers_in_a_task_file_are_rejected_in_one_short_line(tmp_path, change, key):
    data = _raw(NORM)
    change(data)
    from stepforge.benchmark.schema import task_from_dict

    with pytest.raises(TaskFileError) as info:
        task_from_dict(data, "huge.yaml")
    message = _hit(info.value, key)
    assert "2**31" in message and len(info.value.message) < 300


def test_huge_multihot_counts_are_rejected(tmp_path):
    data = _published_multihot(_raw("moe-expert/G_0_6_05"))
    index = next(i for i, d in enumerate(data["inputs"]) if "min" in d)
    data["inputs"][index]["max"] = HUGE
    from stepforge.benchmark.schema import task_from_dict

    with pytest.raises(TaskFileError) as info:
        task_from_dict(data, "huge.yaml")
    assert len(info.value.message) < 300 and f"inputs[{index}].data_gen.max" in info.value.message


def _bomb(levels: int = 12) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,expected", [
    ((TASKS_ROOT / f"{NORM}.yaml").read_text().replace("fns:", "fns: []\nfns:", 1), "duplicate key"),
    (_bomb(), "alias"),
    ("a: " + "[" * 200 + "]" * 200 + "\n", "nested"),
    (b"test_name: \xff\xfe\n", "not utf-8"),
])
def test_a_task_file_goes_through_the_bounded_reader(tmp_path, text, expected):
    path = tmp_path / "G_0_8_01.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    error = _error(path)
    assert str(path) in error.message and expected in error.message.lower() and len(error.message) < 300
