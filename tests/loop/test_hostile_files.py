"""Hostile files through the `stepforge` CLI: one error line and exit 2, never a traceback, a hang or data loss.

Issue 16, classes 3, 5 and 6: YAML alias bombs (config, program file, run
config, knowledge file, reply, task IR; the seed buffer is JSON, which has
no aliases, so its bomb is deep nesting), undecodable bytes, nesting
thousands deep, run-directory files of the wrong shape, a `proposer.factory`
of the wrong signature, duplicate keys and an emptied run config. Every
refusal names the file and the key or line; a refused `--resume` leaves the
run directory as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_hostile_loop import yaml_bomb
from typer.testing import CliRunner

from stepforge.cli import app

TESTS = Path(__file__).resolve().parent
TASK = "moe-index/G_0_3_04"
BOMB = yaml_bomb()  # 9 ** 9 values expanded, about 300 bytes
DEEP_FLOW = "[" * 5_000 + "]" * 5_000
DEEP_BLOCK = "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v\n"
UNDECODABLE = {
    "latin-1": "tasks: [caf\u00e9]\n".encode("latin-1"),
    "utf-16": "tasks: [a]\n".encode("utf-16"),
    "lone 0xff": b"name: x\xff\n",
}


def no_args():
    """A `proposer.factory` of the wrong signature."""


def not_a_proposer(cfg, tasks):
    """A `proposer.factory` that returns something else."""
    return object()


NOT_CALLABLE = 3


def cli(*args: str, stdin: bytes | None = None):
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.stderr


def one_line_error(code: int, stderr: str, *needles: str) -> str:
    """Assert exit 2 with one `error:` line (no traceback) holding every needle; return the line."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def config_text(**extra) -> str:
    base = {"name": "files", "tasks": [TASK], "variant": "agent+si",
            "proposer": {"kind": "custom", "factory": "test_loop_scripted:benchmark_factory", "options": {"every": 1}},
            "guardian": {"kind": "rule"}, "temperatures": [0.4], "n": 1, "max_rounds": 1,
            "verifier": {"kind": "inline", "seeds": [0]}, "progress": False}
    return yaml.safe_dump({**base, **extra}, sort_keys=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A small finished run directory (scripted proposer, one task)."""
    from stepforge.loop.job import run_improve

    tmp = tmp_path_factory.mktemp("finished")
    path = write(tmp / "c.yaml", config_text())
    run_improve(path, run_dir=tmp / "run")
    return tmp / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock file, by name."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def running(run: Path) -> None:
    """Mark the run unfinished, so that `--resume` replays it."""
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "status": "running"}))


# ---------------------------------------------------------------------------
# class 3: alias bombs


def test_alias_bomb_config_is_refused_naming_the_line(tmp_path):
    for name, text in {"tasks": BOMB + "tasks: *a8\n", "name": BOMB + "name: *a8\n",
                       "nested": "proposer:\n  options:\n" + "".join("    " + ln + "\n" for ln in BOMB.splitlines())}.items():
        path = write(tmp_path / f"{name}.yaml", text)
        code, err = cli("improve", "--config", str(path), "--run-dir", str(tmp_path / f"r-{name}"))
        one_line_error(code, err, f"{path}: line ", "alias bomb")
        assert not (tmp_path / f"r-{name}").exists()


def test_alias_bomb_program_file_run_config_and_knowledge_file(tmp_path, run_copy):
    impl = write(tmp_path / "prog.yaml", BOMB + "impl: *a8\n")
    one_line_error(*cli("verify", "norm/G_0_8_01", "--impl", str(impl)), str(impl), "alias bomb")

    before = snapshot(run_copy)
    write(run_copy / "config.yaml", BOMB + "tasks: *a8\n")
    one_line_error(*cli("improve", "--resume", str(run_copy)), "config.yaml: line ", "alias bomb")
    one_line_error(*cli("report", str(run_copy)), "config.yaml: line ", "alias bomb")
    assert snapshot(run_copy) == {**before, "config.yaml": (run_copy / "config.yaml").read_bytes()}

    from stepforge.loop.agents.knowledge import KnowledgeError, _read_yaml

    with pytest.raises(KnowledgeError, match="kb.yaml: line .*alias bomb"):
        _read_yaml(write(tmp_path / "kb.yaml", BOMB))


def test_alias_bomb_task_ir_and_reply_are_refused_or_ignored():
    from stepforge.loop.agents.prompts import strip_impl
    from stepforge.loop.agents.replies import extract_program_with_reason
    from stepforge.loop.search.task import SearchTask, SearchTaskError

    ir = "test_name: t\n" + BOMB + "fns: *a8\nimpl: |\n  return E0\n"
    with pytest.raises(SearchTaskError, match="alias bomb"):
        SearchTask.from_ir(ir)
    assert strip_impl(ir) == ir  # not readable as a task: kept as it is
    found, _ = extract_program_with_reason("```yaml\n" + BOMB + "impl: *a8\n```")
    assert found is None


_GUARD = """
import sys
from test_hostile_loop import yaml_bomb
from stepforge.config_io import ConfigError, read_yaml_text
from stepforge.loop.agents.replies import extract_program_with_reason
from stepforge.loop.buffer import SeedBufferError, read_seed_buffer
for levels in (9, 12, 20):
    top = "*a%d" % (levels - 1)
    try:
        read_yaml_text(yaml_bomb(levels) + "x: " + top, "bomb")
        sys.exit("a bomb was read")
    except ConfigError:
        pass
    assert extract_program_with_reason("```yaml\\n" + yaml_bomb(levels) + "impl: " + top + "\\n```")[0] is None
for text in ("[" * 4_000_000, "x: " + "{a: " * 1_000_000):  # the scanner stops at the depth bound
    try:
        read_yaml_text(text, "deep")
        sys.exit("a deep document was read")
    except ConfigError:
        pass
try:
    read_seed_buffer(sys.argv[1])
    sys.exit("a nested seed buffer was read")
except SeedBufferError:
    pass
print("ok")
"""


def test_bombs_fail_fast_in_a_subprocess(tmp_path):
    """A guard, not a timing assertion: the refusals above end well inside a generous limit."""
    seed = write(tmp_path / "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parents[1].parent),
                                                       os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _GUARD, str(seed)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------------
# class 5: undecodable bytes, deep nesting, wrong shapes, wrong factory


@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_undecodable_config_program_and_seed_buffer(tmp_path, kind):
    data = UNDECODABLE[kind]
    path = write(tmp_path / "c.yaml", data)
    one_line_error(*cli("improve", "--config", str(path), "--run-dir", str(tmp_path / "r")), str(path), "not UTF-8")
    impl = write(tmp_path / "prog.py", data)
    one_line_error(*cli("verify", "norm/G_0_8_01", "--impl", str(impl)), str(impl), "byte ", "not UTF-8")
    one_line_error(*cli("verify", "norm/G_0_8_01", "--impl", "-", stdin=data), "<stdin>", "not UTF-8")
    seed = write(tmp_path / "seed.jsonl", data)
    config = write(tmp_path / "s.yaml", config_text(seed_buffer=str(seed)))
    one_line_error(*cli("improve", "--config", str(config), "--run-dir", str(tmp_path / "r")),
                   "seed_buffer", str(seed), "not UTF-8")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", [f"tasks: {DEEP_FLOW}\n", DEEP_BLOCK, "x: " + "{a: " * 3_000 + "}" * 3_000 + "\n",
                                  "tasks: " + "[" * 1_000_000])
def test_config_nested_thousands_deep(tmp_path, text):
    path = write(tmp_path / "c.yaml", text)
    one_line_error(*cli("improve", "--config", str(path), "--run-dir", str(tmp_path / "r")), str(path),
                   "nested more than")


def test_seed_buffer_lines_nested_deep_or_of_the_wrong_shape(tmp_path):
    for name, line in {"deep": "[" * 100_000, "list": "[1, 2]", "huge int": "9" * 10_000,
                       "no task": json.dumps({"impl": "return E0\n"})}.items():
        seed = write(tmp_path / f"{name}.jsonl", "\n" + line + "\n")
        config = write(tmp_path / "s.yaml", config_text(seed_buffer=str(seed)))
        one_line_error(*cli("improve", "--config", str(config), "--run-dir", str(tmp_path / "r")),
                       f"{seed}: line 2: not a buffer entry")


@pytest.mark.parametrize("name, text, needle", [
    ("state.json", "[]", "state.json: (top level): expected a JSON object, got list"),
    ("state.json", '"done"', "expected a JSON object, got str"),
    ("state.json", "[" * 100_000, "state.json: not valid JSON: nested too deep"),
    ("state.json", b"\xff\xfe{}", "state.json: not valid JSON"),
    ("steps.jsonl", '{"round": "zero"}\n', "steps.jsonl: record 1: round: expected an integer"),
    ("steps.jsonl", '{"round": 0}\n', "steps.jsonl: record 1: step: required key is missing"),
    ("prompts.jsonl", '{"messages": []}\n', "prompts.jsonl: record 1: prompt_id: required key is missing"),
    ("prompts.jsonl", '{"prompt_id": 7, "messages": "hi"}\n', "prompts.jsonl: record 1: prompt_id"),
    ("prompts.jsonl", "[" * 100_000 + "\n{}\n", "prompts.jsonl: line 1: not a JSON record (nested too deep)"),
    ("samples.jsonl", '{"round": 0}\n', "samples.jsonl: record 1: step: required key is missing"),
])
def test_run_files_of_the_wrong_shape_on_resume(run_copy, name, text, needle):
    running(run_copy)
    write(run_copy / name, text)
    before = snapshot(run_copy)
    one_line_error(*cli("improve", "--resume", str(run_copy)), needle)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("name, text, needle", [
    ("steps.jsonl", '{"round": 0, "step": 0}\n', "steps.jsonl: record 1: demonstrations: required key is missing"),
    ("buffer.jsonl", '{"task_key": 3}\n', "buffer.jsonl: record 1: task_key"),
    ("state.json", "[1]", "state.json: (top level): expected a JSON object, got list"),
])
def test_report_of_run_files_of_the_wrong_shape(run_copy, name, text, needle):
    write(run_copy / name, text)
    one_line_error(*cli("report", str(run_copy)), needle)


@pytest.mark.parametrize("factory, needle", [
    ("test_hostile_files:no_args", "must be a callable taking (config, tasks)"),
    ("test_hostile_files:NOT_CALLABLE", "must be a callable taking (config, tasks)"),
    ("test_hostile_files:not_a_proposer", "returned object, not a Proposer"),
    ("test_hostile_files:missing", "cannot import"),
    ("no_such_module_here:f", "cannot import"),
])
def test_proposer_factory_of_the_wrong_signature(tmp_path, factory, needle):
    config = write(tmp_path / "c.yaml", config_text(proposer={"kind": "custom", "factory": factory}))
    one_line_error(*cli("improve", "--config", str(config), "--run-dir", str(tmp_path / "r")),
                   f"{config}: proposer.factory: ", needle)


# ---------------------------------------------------------------------------
# class 6: silent data loss


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path):
    config = write(tmp_path / "c.yaml", config_text() + f"tasks: [{TASK}]\n")
    line = one_line_error(*cli("improve", "--config", str(config), "--run-dir", str(tmp_path / "r")),
                          str(config), "duplicate key 'tasks' (first at line 2")
    assert line.count("line") == 2
    nested = write(tmp_path / "n.yaml", config_text().replace("guardian:\n", "guardian:\n  kind: none\n", 1))
    one_line_error(*cli("improve", "--config", str(nested), "--run-dir", str(tmp_path / "r")), "duplicate key 'kind'")
    impl = write(tmp_path / "prog.yaml", "impl: |\n  return E0\nfns: []\nfns: []\n")
    one_line_error(*cli("verify", "norm/G_0_8_01", "--impl", str(impl)), str(impl), "duplicate key 'fns'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", ["", "\n\n", "# emptied\n", "---\n", b"\xef\xbb\xbf"])
def test_resume_refuses_an_emptied_config_and_changes_nothing(run_copy, text):
    running(run_copy)
    write(run_copy / "config.yaml", text)
    before = snapshot(run_copy)
    one_line_error(*cli("improve", "--resume", str(run_copy)), "config.yaml: (top level): the file is empty")
    assert snapshot(run_copy) == before


def test_resume_refuses_a_duplicate_key_in_the_run_config_and_changes_nothing(run_copy):
    running(run_copy)
    with open(run_copy / "config.yaml", "a", encoding="utf-8") as fh:
        fh.write("tasks: [gemm/G_0_6_02]\n")
    before = snapshot(run_copy)
    one_line_error(*cli("improve", "--resume", str(run_copy)), "config.yaml: line ", "duplicate key 'tasks'")
    assert snapshot(run_copy) == before


def test_a_huge_value_in_the_config_is_shown_short(tmp_path):
    config = write(tmp_path / "c.yaml", config_text(tasks=["x" * 1_000_000 + "]"]))
    line = one_line_error(*cli("improve", "--config", str(config), "--run-dir", str(tmp_path / "r")),
                          f"{config}: tasks[0]: ")
    assert len(line) < 400
