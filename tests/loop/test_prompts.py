"""Prompts: structure, order, the shared prefix, the Python variant; and the LLM proposer that sends them."""

from __future__ import annotations

import ast
import os
import re
import string

import pytest
import torch

from stepforge.benchmark.schema import Task, load_benchmark
from stepforge.loop.agents.knowledge import load_knowledge
from stepforge.loop.agents.prompts import (
    TEMPLATES_DIR,
    guardian_messages,
    proposer_messages,
    render_task,
    render_task_ir,
    strip_impl,
    task_as_python,
)
from stepforge.loop.agents.proposer import LLMProposer, make_proposer
from stepforge.loop.interfaces import Demonstration, ProposalRequest
from stepforge.serve.base import Completion, GenerationResult
from stepforge.serve.errors import BackendUnavailableError, PromptTooLongError
from stepforge.simulator import StreamType, parse_dims, parse_dtype

KNOWLEDGE = load_knowledge()
TASKS = load_benchmark()
KB = KNOWLEDGE.example_map


def tokens(text: str) -> int:
    """A simple tokenizer: words and single punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def demo(name: str, rate: float) -> Demonstration:
    task = KB[name].task
    return Demonstration(task_key=f"knowledge/{name}", task=task, impl=task.impl, success_rate=rate)


DEMOS = [demo("kb_partition_merge", 0.1), demo("kb_repeat", 0.3), demo("kb_map", 0.9)]  # hardest first


def target(key: str) -> str:
    return render_task_ir(TASKS[key])


# -- the task as the model sees it --------------------------------------------------------


def test_render_task_ir_leaves_out_impl_and_metadata_and_round_trips():
    task = TASKS["moe-index/G_0_3_03"]
    ir = render_task_ir(task)
    assert "impl" not in ir and "description" not in ir and "bindings" not in ir and "group" not in ir
    again = Task.from_yaml(ir)
    assert again.fns == task.fns and again.outputs == task.outputs and again.impl is None
    assert render_task_ir(task.to_yaml()) == ir == render_task_ir(task.to_dict())
    with_impl = render_task_ir(task, include_impl=True)
    assert with_impl.startswith(ir) and "impl: |" in with_impl
    assert "description:" in render_task_ir(task, include_meta=True)


def test_strip_impl_keeps_the_rest_verbatim():
    for key, task in TASKS.items():
        full = task.to_yaml(include_impl=True, include_meta=True)
        assert strip_impl(full) == task.to_yaml(include_impl=False, include_meta=True), key
        assert strip_impl(render_task_ir(task)) == render_task_ir(task)
    assert strip_impl("a: 1  # note\nimpl: |\n  x = 1\n\n  return x\nb: 2\n") == "a: 1  # note\nb: 2\n"
    assert strip_impl("{a: 1, impl: x}") == "a: 1\n"
    assert strip_impl("not: [valid") == "not: [valid"


def test_the_task_text_is_shown_as_given():
    ir = "# a task with a comment\n" + target("bmm/bmm_0")
    user = proposer_messages(KNOWLEDGE, [], ir)[1]["content"]
    assert ir.rstrip() in user


def test_templates_are_files_and_fully_filled():
    names = {p.stem for p in TEMPLATES_DIR.glob("*.txt")}
    assert {"proposer_system", "proposer_user", "demonstration", "guardian_system", "guardian_user"} <= names
    for style, mode in (("ir", "closed"), ("python", "closed"), ("ir", "open")):
        for m in proposer_messages(KNOWLEDGE, DEMOS, target("norm/G_0_8_01"), style=style, mode=mode):
            assert not re.search(r"\$\{?[A-Za-z_]", m["content"].replace("$$", "")), style  # no placeholder left
    for m in guardian_messages(target("norm/G_0_8_01"), "return E0\n"):
        assert "$" not in m["content"]
    for path in TEMPLATES_DIR.glob("*.txt"):
        string.Template(path.read_text()).substitute(  # every placeholder of every template is one we fill
            {k: "" for k in ("knowledge", "task_form", "demonstrations", "task", "items", "number", "impl", "title",
                             "affine_rule", "examples", "program", "test_name", "input_names", "output_names",
                             "answer", "candidate", "text", "language", "vocabulary_intro", "vocabulary",
                             "guarded", "stage", "where", "message")})


# -- proposer messages ------------------------------------------------------------------------


def test_proposer_messages_structure():
    messages = proposer_messages(KNOWLEDGE, DEMOS, target("norm/G_0_8_01"))
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert KNOWLEDGE.render() in system
    assert "```python" in user and "impl" in user
    assert user.rstrip().endswith("```")  # the task comes last
    assert user.rstrip()[: -3].rstrip().endswith(target("norm/G_0_8_01").rstrip())


def test_demonstrations_come_in_the_given_order_before_the_task():
    task_ir = target("attention/G_0_4_01")
    user = proposer_messages(KNOWLEDGE, DEMOS, task_ir)[1]["content"]
    positions = [user.index(d.impl.rstrip()) for d in DEMOS]
    assert positions == sorted(positions)
    irs = [user.index(d.task_ir.rstrip()) for d in DEMOS]
    assert all(ir < impl for ir, impl in zip(irs, positions))  # each: task, then its impl
    assert irs == sorted(irs) and irs[1] > positions[0]
    assert positions[-1] < user.index(task_ir.rstrip())
    reversed_user = proposer_messages(KNOWLEDGE, DEMOS[::-1], task_ir)[1]["content"]
    assert [reversed_user.index(d.impl.rstrip()) for d in DEMOS] == sorted(
        [reversed_user.index(d.impl.rstrip()) for d in DEMOS], reverse=True)


def test_the_target_task_never_shows_its_impl():
    task = TASKS["moe-expert/G_0_5_02"]
    leaked = render_task_ir(task, include_impl=True)  # even if a caller passes the task with its impl
    for style in ("ir", "python"):
        text = "".join(m["content"] for m in proposer_messages(KNOWLEDGE, [], leaked, style=style))
        assert task.impl.splitlines()[2] not in text  # `xa = step.Zip().apply((E0, E2))`
        assert "parts = step.Partition(N=E_value).apply((xa, route_0))" not in text


def test_prompts_for_different_tasks_share_everything_up_to_the_task():
    a = proposer_messages(KNOWLEDGE, DEMOS, target("norm/G_0_8_01"))
    b = proposer_messages(KNOWLEDGE, DEMOS, target("bmm/bmm_0"))
    assert a[0] == b[0]
    ua, ub = a[1]["content"], b[1]["content"]
    common = len(os.path.commonprefix([ua, ub]))
    task_at = ua.index(target("norm/G_0_8_01").rstrip())
    assert common >= task_at - len("```yaml\n")  # everything before the task's own text is shared
    assert ua[:common].count("### Solved task") == len(DEMOS)
    assert "Write the impl" in ua[:common]
    # the same holds for the Python style
    pa = proposer_messages(KNOWLEDGE, DEMOS, target("norm/G_0_8_01"), style="python")
    pb = proposer_messages(KNOWLEDGE, DEMOS, target("bmm/bmm_0"), style="python")
    assert pa[0] == pb[0]
    common = len(os.path.commonprefix([pa[1]["content"], pb[1]["content"]]))
    assert pa[1]["content"][:common].count("### Solved task") == len(DEMOS)


def test_no_demonstrations():
    user = proposer_messages(KNOWLEDGE, [], target("norm/G_0_8_01"))[1]["content"]
    assert "Solved task" not in user and user.startswith("Write the impl")


def test_python_style_renders_every_task_and_costs_more_tokens():
    total_ir = total_py = 0
    for key in TASKS:
        ir = proposer_messages(KNOWLEDGE, DEMOS, target(key))
        py = proposer_messages(KNOWLEDGE, DEMOS, target(key), style="python")
        assert "def fn_" in py[1]["content"] and "test_name:" not in py[1]["content"].split("Task:")[-1]
        total_ir += sum(tokens(m["content"]) for m in ir)
        total_py += sum(tokens(m["content"]) for m in py)
    assert total_py > 1.2 * total_ir
    with pytest.raises(ValueError):
        proposer_messages(KNOWLEDGE, [], target("bmm/bmm_0"), style="c++")


def _declared_shapes(decl, binding):
    return StreamType(parse_dtype(decl.dtype), parse_dims(decl.dims)).tensor_shapes(binding)


@pytest.mark.parametrize("key", list(TASKS)[:: 3] + ["moe-expert/G_0_6_05", "moe-index/G_0_13_02"])
def test_task_as_python_runs_and_computes_the_oracle(key):
    task = TASKS[key]
    code = task_as_python(task)
    assert "impl" not in code.replace("impl`", "")
    ast.parse(code)
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, f"<{key}>", "exec"), ns)  # the generated module runs as is
    binding = dict(ns["ctx"])
    for decl in list(task.inputs) + list(task.parameters):
        got = ns[decl.name]
        shapes = [tuple(t.shape) for t in (got if isinstance(got, list) else [got])]
        assert shapes == _declared_shapes(decl, binding), decl.name
    for out in task.outputs:
        for i, block in enumerate(out.transforms()):
            fn = ns[f"expected_{out.name}" if len(out.transforms()) == 1 else f"expected_{out.name}_{i}"]
            got = fn()
            tree = ast.parse(block)
            last = tree.body.pop()
            scope = dict(ns)
            exec(compile(tree, "<oracle>", "exec"), scope)
            want = eval(compile(ast.Expression(last.value), "<oracle>", "eval"), scope)
            assert torch.equal(got, want)
            assert tuple(got.shape) == _declared_shapes(out, binding)[i]
    for f in task.fns:
        assert callable(ns[f.func_name])
        assert (getattr(ns[f.func_name], "init", None) is not None) == (f.init is not None)


def test_guardian_messages():
    before = KNOWLEDGE.guardian_examples[0].before
    messages = guardian_messages(render_task_ir(KB["kb_copy"].task), before)
    system, user = messages[0]["content"], messages[1]["content"]
    assert "consumed at most once" in system
    for ex in KNOWLEDGE.guardian_examples:
        assert ex.before.rstrip() in system and ex.after.rstrip() in system
        assert system.index(ex.before.rstrip()) < system.index(ex.after.rstrip())
    assert before.rstrip() in user and "test_name: kb_copy" in user
    assert user.index("test_name: kb_copy") < user.index(before.rstrip())
    assert "impl:" not in guardian_messages(KB["kb_copy"].text, before)[1]["content"]


def test_render_task_styles():
    assert render_task(KB["kb_map"].task).startswith("```yaml\ntest_name: kb_map")
    assert render_task(KB["kb_map"].task, "python").startswith("```python\n# Task kb_map")


# -- the LLM proposer ----------------------------------------------------------------------------


class ScriptedBackend:
    def __init__(self, reply=lambda req, i: "```python\nS0 = step.Map(fn=fn_square).apply(E0)\nreturn S0\n```",
                 fail=lambda req: None):
        self.reply, self.fail, self.calls = reply, fail, []

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            error = self.fail(r)
            if error is not None:
                raise error
            comps = [Completion(text=self.reply(r, i), finish_reason="stop", completion_tokens=10 * (i + 1))
                     for i in range(r.sampling.n)]
            out.append(GenerationResult(request_id=r.request_id, prompt_tokens=tokens(r.messages[1]["content"]),
                                        completions=comps))
        return out


def _request(key: str, **kw) -> ProposalRequest:
    return ProposalRequest(task_key=key, task=TASKS[key], demonstrations=DEMOS, **kw)


def test_llm_proposer_sends_one_batch_and_returns_proposals_with_costs():
    backend = ScriptedBackend()
    proposer = LLMProposer(backend, KNOWLEDGE, max_tokens=321, top_p=0.9, stop=["\n\n\n"])
    reqs = [_request("norm/G_0_8_01", n=3, temperature=0.4, seed=11), _request("bmm/bmm_0", n=2, temperature=1.0, seed=12)]
    out = proposer.propose(reqs)
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 2
    for req, sent in zip(reqs, backend.calls[0]):
        s = sent.sampling
        assert (s.n, s.temperature, s.seed, s.max_tokens, s.top_p, s.stop) == (req.n, req.temperature, req.seed, 321, 0.9, ["\n\n\n"])
        assert sent.messages == proposer_messages(KNOWLEDGE, DEMOS, req.task_ir)
    assert [len(p) for p in out] == [3, 2]
    first = out[0][1]
    assert first.raw.startswith("```python") and first.completion_tokens == 20
    assert first.prompt_tokens == tokens(backend.calls[0][0].messages[1]["content"])
    assert first.messages == backend.calls[0][0].messages
    total = sum(p.seconds for ps in out for p in ps)
    assert total >= 0 and out[0][2].seconds >= out[0][0].seconds  # time shared by completion tokens


def test_llm_proposer_python_style_and_factory():
    backend = ScriptedBackend()
    proposer = make_proposer(backend, style="python")
    proposer.propose([_request("norm/G_0_8_01")])
    sent = backend.calls[0][0].messages
    assert sent == proposer_messages(KNOWLEDGE, DEMOS, target("norm/G_0_8_01"), style="python")
    with pytest.raises(ValueError):
        LLMProposer(backend, style="yaml")


def test_llm_proposer_isolates_a_prompt_that_is_too_long():
    backend = ScriptedBackend(fail=lambda r: PromptTooLongError("prompt has 9000 tokens") if r.request_id.startswith("bmm") else None)
    proposer = LLMProposer(backend, KNOWLEDGE)
    out = proposer.propose([_request("norm/G_0_8_01", n=2), _request("bmm/bmm_0", n=2), _request("gemm/G_0_6_02", n=0)])
    assert [len(p) for p in out] == [2, 2, 0]
    assert all(p.error is None for p in out[0])
    assert all("PromptTooLongError" in p.error and p.raw == "" for p in out[1])
    with pytest.raises(BackendUnavailableError):  # a backend failure is not hidden
        LLMProposer(ScriptedBackend(fail=lambda r: BackendUnavailableError("down")), KNOWLEDGE).propose([_request("bmm/bmm_0")])


def test_llm_proposer_through_the_transformers_backend_sends_the_full_prompt(hf_backend):
    """The real proposer prompt (knowledge included) fits the tiny model and is counted exactly."""
    proposer = LLMProposer(hf_backend, KNOWLEDGE, max_tokens=4)
    request = _request("bmm/bmm_0", n=2, temperature=0.7)
    (out,) = proposer.propose([request])
    assert len(out) == 2 and all(p.error is None for p in out)
    expected = len(hf_backend.tokenizer.apply_chat_template(out[0].messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert out[0].prompt_tokens == expected > 4000
    assert all(0 < p.completion_tokens <= 4 for p in out)



def test_knowledge_none_is_the_compact_system_prompt():
    """`proposer.knowledge`: `full` puts the STeP reference (operator docs) in the system message,
    `none` keeps only the role (the user message, with the answer format, is the same)."""
    from stepforge.loop.agents.knowledge import CompactKnowledge

    compact = load_knowledge(variant="none")
    assert isinstance(compact, CompactKnowledge) and load_knowledge(variant="full") is KNOWLEDGE
    for style in ("ir", "python"):
        full = proposer_messages(KNOWLEDGE, DEMOS, target("bmm/bmm_0"), style=style)
        none = proposer_messages(compact, DEMOS, target("bmm/bmm_0"), style=style)
        assert none[1] == full[1] and "```python block" in none[1]["content"]
        assert "# STeP reference" in full[0]["content"] and "### Map" in full[0]["content"]
        assert "Call: " in full[0]["content"] and "Example kb_" in full[0]["content"]
        assert "# STeP reference" not in none[0]["content"] and "### " not in none[0]["content"]
        assert none[0]["content"].startswith("You write programs in STeP")
        assert len(none[0]["content"]) < 1000 < 10 * len(none[0]["content"]) < len(full[0]["content"])
    with pytest.raises(ValueError, match="unknown knowledge 'some'"):
        load_knowledge(variant="some")
