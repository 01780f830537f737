"""A task may introduce its own size symbol in `global` and use it in dims."""

from stepforge.benchmark.schema import Task
from stepforge.benchmark.verifier import verify

TASK = """
test_name: scale_by_h
global: |
  H_value = 4
  ctx[H] = H_value
inputs:
  - name: E0
    dtype: fp32
    dims: [H, M]
    data_gen: torch.rand
fns:
  - name: add
    func_name: fn_add
    input_dtype: fp32
    output_dtype: fp32
    init: [0]
    apply: |
      [state[0] + input[0]]
outputs:
  - name: S0
    dtype: fp32
    dims: [M]
    data_transform:
      - input_data['E0'].sum(-1)
impl: |
  S = step.Accum(fn=fn_add, b=1).apply(E0)
  return S
"""


def test_a_new_size_symbol_set_through_ctx_by_name_verifies():
    task = Task.from_yaml(TASK, "inline")
    assert verify(task).passed
    wrong = verify(task, "S = step.Accum(fn=fn_add, b=1).apply(E0)\nS2 = step.Repeat(n=H).apply(S)\nreturn S2")
    assert wrong.stage == "shape"
