"""Hostile model replies and plug-ins in the generation step: each ends as its candidate's failed sample.

Issue 16, class 1: one reply (or one guardian failure on one candidate) must
never end a `stepforge improve` run, and `--resume` of such a run must finish
too. The replies below are the red team's inputs and variants of them; the
executor contains whatever the extraction or the guardian does with one
candidate (loop/executor.py `contained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stepforge.benchmark.verdict import Verdict
from stepforge.loop.executor import Executor, SampleJob, contained, storable
from stepforge.loop.interfaces import Guardian, GuardResult, Proposal, ProposalRequest, Proposer
from stepforge.loop.runstore import load_jsonl
from stepforge.loop.verifiers import InlineVerifier

TASK = "moe-index/G_0_3_04"
EXTRACT_BOOM = "EXTRACT_BOOM"  # the patched extractor raises on replies holding this
GUARD_BOOM = "GUARD_BOOM"  # the patched rule guardian raises on programs holding this


def yaml_bomb(levels: int = 9, width: int = 9) -> str:
    """A billion-laughs document: `width ** levels` values once every alias is expanded."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def hostile_replies(reference: str) -> dict[str, str]:
    """The red team's replies (and variants), by name."""
    fence = "```python\n{}\n```\n".format
    return {
        "huge int literal": fence("x = step.Accum(fn=fn_add, b=" + "9" * 20_000 + ").apply(E0)\nreturn x"),
        "huge bare literal": "y = " + "7" * 100_000 + "\nreturn y\n",
        "huge float literal": fence("x = step.Accum(fn=fn_add, b=1" + "0" * 5_000 + ".5e999999).apply(E0)\nreturn x"),
        "NUL bytes": fence("\x00x = step\x00.Map(fn=f).apply(E0)\x00\nreturn x\x00"),
        "only NULs": "\x00" * 1_000,
        "1 MB of statements": fence("x = step.Map(fn=f).apply(E0)\n" * 40_000 + "return x"),
        "1 MB line": "a" * (1 << 20),
        "lone surrogate in a comment": fence("return E0  # \ud800"),
        "lone surrogates only": "\udfff\ud800" * 1_000,
        "deeply nested parentheses": fence("return " + "(" * 100_000 + "E0" + ")" * 100_000),
        "unclosed brackets": fence("x = step.Map(fn=" + "[" * 200_000 + "\nreturn x"),
        "YAML bomb beside impl": "```yaml\n" + yaml_bomb() + "impl: |\n  return E0\n```\n",
        "YAML bomb as impl": "```yaml\n" + yaml_bomb() + "impl: *a8\n```\n",
        "YAML nested deep": "```yaml\nimpl: " + "[" * 10_000 + "\n```\n",
        "YAML duplicate impl": "```yaml\nimpl: |\n  return E0\nimpl: |\n  return E1\n```\n",
        "extractor raises": f"{EXTRACT_BOOM}\n" + fence(reference.rstrip()),
        "guardian raises": fence(f"# {GUARD_BOOM}\n" + reference.rstrip()),
    }


class HostileProposer(Proposer):
    """Sample i of every request is hostile reply i; the last sample is the task's reference impl."""

    name = "hostile"

    def __init__(self, replies: list[str]):
        self.replies = replies

    def propose(self, requests: list[ProposalRequest]) -> list[list[Proposal]]:
        return [[Proposal(raw=text, prompt_tokens=1, completion_tokens=1) for text in self.replies[: r.n]]
                for r in requests]


def _replies(tasks) -> list[str]:
    reference = tasks[TASK].impl
    return list(hostile_replies(reference).values()) + [f"```python\n{reference}```\n"]


def hostile_factory(cfg, tasks) -> Proposer:
    """`proposer.factory: test_hostile_loop:hostile_factory`."""
    return HostileProposer(_replies(tasks))


@pytest.fixture
def booby_traps(monkeypatch):
    """The default extractor raises on EXTRACT_BOOM replies; the rule guardian on GUARD_BOOM programs."""
    from stepforge.loop.agents import guardians, replies

    real_extract, real_repair = replies.extract_program_with_reason, guardians.repair_affine

    def extract(reply):
        if EXTRACT_BOOM in reply:
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return real_extract(reply)

    def repair(program):
        if GUARD_BOOM in program:
            raise RecursionError("maximum recursion depth exceeded while reformatting")
        return real_repair(program)

    monkeypatch.setattr(replies, "extract_program_with_reason", extract)
    monkeypatch.setattr(guardians, "repair_affine", repair)


def _view(run: Path) -> dict:
    return {(r["round"], r["step"], r["task"], r["temperature"], r["index"]):
            (r["raw"], r["program"], r["guarded"], r["verdict"]["stage"], r["verdict"]["message"], r["correct"])
            for r in load_jsonl(run / "samples.jsonl")}


def test_improve_with_hostile_replies_completes_records_them_failed_and_resumes(tmp_path, booby_traps):
    from stepforge.loop.job import run_improve

    names = list(hostile_replies("")) + ["reference"]
    config = {
        "name": "hostile", "tasks": [TASK], "variant": "agent+si",
        "proposer": {"kind": "custom", "factory": "test_hostile_loop:hostile_factory"},
        "guardian": {"kind": "rule"}, "temperatures": [0.4], "n": len(names), "max_rounds": 1, "chunk_size": 1,
        "verifier": {"kind": "inline", "seeds": [0]}, "progress": False,
    }
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    outcome = run_improve(path, run_dir=run)
    assert outcome.summary["run"]["tasks_solved"] == 1

    records = sorted(load_jsonl(run / "samples.jsonl"), key=lambda r: r["index"])
    assert [r["index"] for r in records] == list(range(len(names)))
    by_name = dict(zip(names, records))
    assert by_name["reference"]["correct"]
    for name, rec in by_name.items():
        message = rec["verdict"]["message"]
        assert "\n" not in message and len(message) < 600, (name, message[:200])
        if name != "reference":
            assert not rec["correct"], name
    extract = by_name["extractor raises"]["verdict"]
    assert extract["stage"] == "parse" and extract["message"].startswith("reading the reply failed: ValueError")
    guard = by_name["guardian raises"]
    assert guard["verdict"]["stage"] == "generate" and not guard["verified"] and guard["guarded"] is None
    assert guard["verdict"]["message"].startswith("the rule guardian failed: RecursionError")
    assert by_name["lone surrogate in a comment"]["raw"].endswith("# \ufffd\n```\n")  # stored, as U+FFFD
    for name in ("huge int literal", "deeply nested parentheses", "YAML bomb as impl", "YAML nested deep", "1 MB line"):
        assert by_name[name]["verdict"]["stage"] == "parse", name
    # the YAML bomb block is refused by the bounded reader, and the indent rule still finds the impl beside it
    assert by_name["YAML bomb beside impl"]["program"] == "return E0\n"

    # a run killed half way through its samples resumes to the same records
    full = _view(run)
    lines = (run / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (run / "samples.jsonl").write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    for name in ("steps.jsonl", "buffer.jsonl", "state.json", "summary.json"):
        (run / name).unlink()
    again = run_improve(None, resume=run)
    assert again.new_samples == len(lines) - len(lines) // 2
    assert _view(run) == full
    assert json.loads((run / "state.json").read_text())["status"] == "done"


class _Raising(Guardian):
    """Raises for any batch holding a program with `bad`; returns the others unchanged."""

    name = "raising"

    def __init__(self, bad: str):
        self.bad, self.calls = bad, 0

    def repair(self, requests):
        self.calls += 1
        if any(self.bad in r.program for r in requests):
            raise RuntimeError("boom\nsecond line")
        return [GuardResult(program=r.program) for r in requests]


class _Fixed(Proposer):
    def __init__(self, replies):
        self.replies = replies

    def propose(self, requests):
        return [[Proposal(raw=t) for t in self.replies[r.task_key]] for r in requests]


def _jobs(keys, n):
    from support import make_task

    return [SampleJob(round=0, step=0, task=k, spec=make_task(k), temperature=0.4, n=n, seed=i)
            for i, k in enumerate(keys)]


def _ok(task, program):
    return Verdict(passed=True, stage="ok")


@pytest.mark.parametrize("chunk_size", [1, 8])
def test_a_guardian_raising_for_one_request_fails_only_that_requests_samples(chunk_size):
    replies = {"A": ["return E0\n", "bad = 1\nreturn E0\n"], "B": ["return E1\n", "return E0\n"]}
    guardian = _Raising("bad")
    ex = Executor(_Fixed(replies), guardian, InlineVerifier(_ok), extract=lambda raw: raw, chunk_size=chunk_size)
    try:
        records = ex.run(_jobs(["A", "B"], 2))
    finally:
        ex.close()
    got = {(r.task, r.index): (r.verdict.stage, r.verified) for r in records}
    assert got == {("A", 0): ("ok", True), ("A", 1): ("generate", False), ("B", 0): ("ok", True),
                   ("B", 1): ("ok", True)}
    failed = next(r for r in records if r.verdict.stage == "generate")
    assert failed.verdict.message == "the raising guardian failed: RuntimeError: boom second line"
    assert failed.program == "bad = 1\nreturn E0\n" and failed.guarded is None


@pytest.mark.parametrize("results", [[], None, ["not a result"]])
def test_a_guardian_returning_the_wrong_results_fails_its_samples(results):
    class Wrong(Guardian):
        name = "wrong"

        def repair(self, requests):
            return results

    ex = Executor(_Fixed({"A": ["return E0\n"] * 2}), Wrong(), InlineVerifier(_ok), extract=lambda raw: raw)
    try:
        records = ex.run(_jobs(["A"], 2))
    finally:
        ex.close()
    assert [(r.verdict.stage, r.verified) for r in records] == [("generate", False)] * 2
    assert all(r.verdict.message.startswith("the wrong guardian failed: ") for r in records)


@pytest.mark.parametrize("error", [ValueError("x" * 10_000), RecursionError(), MemoryError(), KeyError("k"),
                                   UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")])
def test_an_extractor_that_raises_fails_only_its_reply(error):
    def extract(raw):
        if raw == "boom":
            raise error
        return raw

    ex = Executor(_Fixed({"A": ["boom", "return E0\n"]}), None, InlineVerifier(_ok), extract=extract)
    try:
        records = ex.run(_jobs(["A"], 2))
    finally:
        ex.close()
    assert [r.verdict.stage for r in records] == ["parse", "ok"]
    message = records[0].verdict.message
    assert message.startswith(f"reading the reply failed: {type(error).__name__}") and len(message) < 250


def test_contained_never_lets_an_exception_through_and_storable_text_encodes():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no text")

    def raise_it():
        raise Unprintable()

    value, error = contained("work", raise_it)
    assert value is None and error.startswith("work failed: Unprintable")
    assert contained("work", int, "7") == (7, None)
    for text in ("\ud800", "a\udfffb" * 3, "ok", "\x00"):
        storable(text).encode("utf-8")
