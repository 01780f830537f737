"""Task selection: splits, groups, difficulty and mode, in configs, ablation splits and `stepforge tasks`."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_task
from typer.testing import CliRunner

from stepforge.benchmark.schema import load_benchmark
from stepforge.benchmark.selection import (
    PUBLISHED,
    ProgramStats,
    difficulty_of_stats,
    program_stats,
    select,
    task_difficulty,
)
from stepforge.cli import app
from stepforge.errors import ConfigError
from stepforge.loop.config import config_from_dict, select_tasks

TASKS = load_benchmark()


def test_published_split_is_the_26_shipped_tasks_and_new_is_the_rest():
    assert len(PUBLISHED) == 26 and set(PUBLISHED) <= set(TASKS)
    assert select("published", TASKS) == [k for k in TASKS if k in PUBLISHED]
    assert select("all", TASKS) == list(TASKS)
    published = {k: TASKS[k] for k in PUBLISHED}
    extra = {**published, "norm/extra_rms": TASKS["norm/G_0_8_01"], "pooling/p1": TASKS["bmm/bmm_0"]}
    assert select("new", extra) == ["norm/extra_rms", "pooling/p1"]
    assert select({"split": "new", "groups": ["norm"]}, extra) == ["norm/extra_rms"]
    assert select("new", TASKS) == [k for k in TASKS if k not in PUBLISHED]
    with pytest.raises(ConfigError, match="selects no task"):
        select(["new"], published)


def test_difficulty_rule_on_programs():
    assert program_stats("S0 = step.Map(fn=f).apply(E0)\nreturn S0\n") == ProgramStats(1, 0, False)
    routed = ("A, B = step.Copy().apply(E0)\nP = step.Partition(fn=r).apply(A)\nQ = step.Map(fn=f).apply(P)\n"
              "S0 = step.Merge(fn=g).apply(Q)\nreturn S0\n")
    assert program_stats(routed) == ProgramStats(4, 1, True)
    assert difficulty_of_stats(ProgramStats(4, 1, True)) == "hard"
    assert difficulty_of_stats(ProgramStats(12, 0, False)) == "hard"
    assert difficulty_of_stats(ProgramStats(3, 2, False)) == "hard"
    assert difficulty_of_stats(ProgramStats(6, 0, False)) == "easy"
    assert difficulty_of_stats(ProgramStats(4, 1, False)) == "medium"
    assert difficulty_of_stats(ProgramStats(7, 0, False)) == "medium"
    assert task_difficulty(TASKS["moe-expert/G_0_6_05"]) == "hard"  # routes
    assert task_difficulty(TASKS["rope/G_0_3_02"]) == "easy"
    assert task_difficulty(TASKS["norm/G_0_8_01"]) == "medium"
    assert task_difficulty(make_task("t").without_impl()) is None


FILTERS = st.fixed_dictionaries({}, optional={
    "split": st.sampled_from(["published", "new", "all"]),
    "groups": st.lists(st.sampled_from(["norm", "moe-*", "bmm", "*"]), min_size=1, max_size=2, unique=True),
    "difficulty": st.lists(st.sampled_from(["easy", "medium", "hard"]), min_size=1, max_size=2, unique=True),
    "mode": st.sampled_from(["closed", "open"]),
    "keys": st.lists(st.sampled_from(["attention/*", "moe-index/G_0_3_03", "bmm_1", "published"]), min_size=1, max_size=2),
})


@settings(max_examples=40, deadline=None)
@given(FILTERS)
def test_a_mapping_selects_the_intersection_of_its_filters(spec):
    import fnmatch

    def keeps(key):
        t = TASKS[key]
        ok = spec.get("split", "all") in ("all", "published" if key in PUBLISHED else "new")
        if "groups" in spec:
            ok &= any(fnmatch.fnmatchcase(t.group, g) for g in spec["groups"])
        if "difficulty" in spec:
            ok &= task_difficulty(t) in spec["difficulty"]
        if spec.get("mode") == "open":
            ok &= getattr(t, "open", True)
        if "keys" in spec:
            ok &= key in select(spec["keys"], TASKS)
        return ok

    expected = [k for k in TASKS if keeps(k)]
    if expected:
        assert select(spec, TASKS) == expected
    else:
        with pytest.raises(ConfigError, match="matches no task"):
            select(spec, TASKS)


def test_improve_config_takes_a_selection_and_keeps_it_through_yaml():
    cfg = config_from_dict({"tasks": {"groups": ["norm", "moe-*"], "difficulty": "hard"}})
    keys = select_tasks(cfg.tasks, TASKS)
    assert keys and all(TASKS[k].group == "norm" or TASKS[k].group.startswith("moe-") for k in keys)
    assert all(task_difficulty(TASKS[k]) == "hard" for k in keys)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert select_tasks(again.tasks, TASKS) == keys
    assert select_tasks(config_from_dict({"tasks": "published"}).tasks, TASKS) == list(PUBLISHED_ORDER())
    with pytest.raises(ConfigError, match=r"c.yaml: tasks.groups\[0\]: 'nope' matches no group"):
        select_tasks({"groups": ["nope"]}, TASKS, "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: tasks.*difficulty\[0\]"):
        config_from_dict({"tasks": {"difficulty": ["extreme"]}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: tasks.*split"):
        config_from_dict({"tasks": {"split": "train"}}, "c.yaml")


def PUBLISHED_ORDER():
    return [k for k in TASKS if k in PUBLISHED]


def test_ablation_split_accepts_split_names_and_selections():
    from stepforge.training.ablate import SplitSettings
    from stepforge.training.data import select_task_keys

    s = SplitSettings.model_validate({"train": "published", "test": {"groups": ["rope"]}})
    assert select_task_keys(s.train, "split.train") == PUBLISHED_ORDER()
    assert select_task_keys(s.test, "split.test") == [k for k in TASKS if k.startswith("rope/")]


def test_tasks_command_filters_and_reports_difficulty_and_split():
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "--json", "--group", "moe-*", "--difficulty", "hard"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert rows and all(r["group"].startswith("moe-") and r["difficulty"] == "hard" for r in rows)
    assert all(r["split"] == ("published" if r["key"] in PUBLISHED else "new") for r in rows)
    res = runner.invoke(app, ["tasks", "--json", "--open", "--mode", "closed"])
    assert res.exit_code == 2 and "contradicts --mode closed" in res.output
    res = runner.invoke(app, ["tasks", "--json", "rope/*", "bmm_0"])
    assert [json.loads(line)["key"] for line in res.output.splitlines()] == \
        ["bmm/bmm_0", "rope/G_0_3_02", "rope/G_0_3_03", "rope/G_0_4_01"]
    res = runner.invoke(app, ["tasks", "--difficulty", "extreme"])
    assert res.exit_code == 2 and "difficulty[0]" in res.output


def test_select_option_reads_a_comma_separated_command_line_value():
    from stepforge.benchmark.selection import select_option

    keys = ["norm/a", "norm/b", "bmm/c"]
    assert select_option(" norm/b , bmm/* ,", keys) == ["norm/b", "bmm/c"]
    with pytest.raises(ConfigError, match="--tasks"):
        select_option("nothing/*", keys)
