"""summary.json, report.md and plots of a run directory (`stepforge report RUN_DIR`).

Everything is recomputed from the run directory's files (config.yaml,
samples.jsonl, steps.jsonl, buffer.jsonl, state.json), so a report can be
made for a finished, a killed or a resumed run, any time later.

summary.json keys: `name`, `variant`, `mode` (closed, open or mixed; each task
and group names its own too), `status`, `stop_reason`, `run` (totals:
samples, verifications, tokens, task completion, throughput), `rounds` (per
round), `steps` (per step: demonstrations, tasks sampled, solved), `groups`
(benchmark task groups: tasks, solved), `tasks` (per task: pass@1, pass@n,
tokens, seconds, verdict stages), `programs` (per earned program: lines,
maintainability index with and without comments), `buffer` (task keys in
the order they were earned), `seeded` (task keys of the `seed_buffer`
entries: demonstrations only, never counted as solved). Keys whose name contains `second` or `time`
are timings; everything else is a deterministic function of the config.

Plots (PNG, matplotlib Agg): `tasks_solved.png` (tasks solved, cumulative,
after each round), the plot of what the proposer spent (`tokens.png`: prompt and
completion tokens per round, for models; `search.png`: expansions and candidates
per round from the samples' `cost`, for the search; none when nothing was
spent) and `families.png` (solved fraction per task family). `families` in
summary.json: per group, the mode, tasks, solved, round-0 pass@1 and solved per
difficulty (loop/reporting/families.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from stepforge.loop.reporting import families as F
from stepforge.loop.reporting import metrics as M
from stepforge.loop.runstore import REPORT, RunStore

SOLVED_PLOT, TOKENS_PLOT, SEARCH_PLOT, FAMILIES_PLOT = "tasks_solved.png", "tokens.png", "search.png", "families.png"
PLOTS = (SOLVED_PLOT, TOKENS_PLOT, SEARCH_PLOT, FAMILIES_PLOT)  # tokens for model runs, search for the search proposer
SPEND_PLOTS = (TOKENS_PLOT, SEARCH_PLOT)


def _group_of(task: str) -> str:
    return task.split("/", 1)[0] if "/" in task else "(none)"


def _inputs_by_task(keys: list[str]) -> dict[str, list[str]]:
    """Input stream names per task (to measure programs as functions of their inputs)."""
    try:
        from stepforge.benchmark.schema import load_benchmark

        tasks = load_benchmark()
    except Exception:  # noqa: BLE001 - the report works without the benchmark
        return {}
    return {k: [d.name for d in tasks[k].inputs] for k in keys if k in tasks}


def build_summary(store: RunStore) -> dict[str, Any]:
    """The run's metrics from its files."""
    config = store.config_data()
    state = store.load_state()
    samples = store.sample_dicts()
    steps = [s.model_dump() for s in store.load_steps()]
    everything = [e.model_dump() for e in store.load_buffer()]
    buffer = [e for e in everything if not e.get("source")]  # earned in this run
    seeded = [e for e in everything if e.get("source")]  # `seed_buffer`: demonstrations only, never counted
    tasks_in_run = list(dict.fromkeys((steps[0]["tasks"] if steps else []) + [r["task"] for r in samples]))
    n_tasks = len(tasks_in_run)
    per_task = M.task_metrics(samples)
    for task in tasks_in_run:
        per_task.setdefault(task, {"samples": 0, "correct": 0, "pass@1": 0.0, "pass@n": 0.0, "solved_at": None,
                                   "per_step": [], "per_temperature": {}, "prompt_tokens": 0,
                                   "completion_tokens": 0, "guard_prompt_tokens": 0, "guard_completion_tokens": 0,
                                   "seconds": 0.0, "stages": {}})
    earned = {e["task_key"]: e for e in buffer}
    for task, tm in per_task.items():
        e = earned.get(task)
        tm["earned"] = {"round": e["round"], "step": e.get("step", 0), "success_rate": e["success_rate"],
                        "temperature": e["temperature"]} if e else None
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"tasks": 0, "solved": 0})
    for task in tasks_in_run:
        groups[_group_of(task)]["tasks"] += 1
        groups[_group_of(task)]["solved"] += 1 if task in earned else 0
    wall = sum(float(s.get("seconds", 0.0)) for s in steps)
    run = M.run_metrics(samples, steps, n_tasks, wall_seconds=wall)
    run["cost"] = M.cost_totals(samples)
    run["tasks_solved"] = len(earned)
    run["task_completion"] = len(earned) / n_tasks if n_tasks else 0.0
    programs = M.program_metrics(buffer, _inputs_by_task(list(earned)))
    modes = run_modes(state, config, tasks_in_run)
    for task in tasks_in_run:
        per_task[task]["mode"] = modes[task]
    for group in groups:
        groups[group]["mode"] = _mode_label({modes[t] for t in tasks_in_run if _group_of(t) == group})
    run["mode"] = _mode_label(set(modes.values()))
    summary = {
        "name": config.get("name"),
        "variant": config.get("variant"),
        "mode": run["mode"],
        "status": state.get("status", "unknown"),
        "stop_reason": state.get("stop_reason", ""),
        "run": run,
        "rounds": M.round_metrics(samples, steps),
        "steps": [{"round": s["round"], "step": s["step"], "demonstrations": s["demonstrations"],
                   "tasks": s["tasks"], "solved": s["solved"], "samples": s["samples"], "correct": s["correct"],
                   "seconds": s["seconds"]} for s in steps],
        "groups": dict(sorted(groups.items())),
        "tasks": {k: per_task[k] for k in tasks_in_run},
        "programs": programs,
        "maintainability": {"mean_mi": M.mean(p["mi"] for p in programs.values()),
                            "mean_mi_no_comments": M.mean(p["mi_no_comments"] for p in programs.values())},
        "buffer": [e["task_key"] for e in buffer],
        "seeded": [e["task_key"] for e in seeded],
        "repair": M.repair_metrics(samples),
    }
    summary["families"] = F.family_summary(summary, config.get("mode") or "closed")
    return summary


def run_modes(state: dict, config: dict, tasks: list[str]) -> dict[str, str]:
    """Each task's mode: the state's `modes` (written when any task runs open), else the config's mode."""
    modes = state.get("modes") or {}
    default = config.get("mode") or "closed"
    return {t: modes.get(t, default) for t in tasks}


def _mode_label(modes: set[str]) -> str:
    """`closed`, `open`, or `mixed` for a set of task modes."""
    return next(iter(modes)) if len(modes) == 1 else ("mixed" if modes else "closed")


# ---------------------------------------------------------------------------
# plots


def write_plots(store: RunStore, summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]
    n_tasks = summary["run"]["tasks"]
    out = []

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    ax.plot(xs, [r["solved_total"] for r in rounds], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("tasks solved (cumulative)")
    ax.set_ylim(0, max(n_tasks, 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(xs or [0])
    ax.set_title(f"{summary.get('name') or 'run'}: tasks solved ({summary['run']['tasks_solved']}/{n_tasks})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = store.path(SOLVED_PLOT)
    fig.savefig(path)
    plt.close(fig)
    out.append(path)

    path = store.path(FAMILIES_PLOT)
    F.plot_families(path, list(summary["families"]), [(summary.get("name") or "run", summary["families"])])
    out.append(path)

    spend = spend_plot(summary)
    for stale in SPEND_PLOTS:
        if stale != spend and store.path(stale).is_file():
            store.path(stale).unlink()  # a plot of what this run did not spend
    if spend == SEARCH_PLOT:
        out.append(_search_plot(plt, store, rounds, xs))
    elif spend == TOKENS_PLOT:
        out.append(_tokens_plot(plt, store, rounds, xs))
    return out


def _tokens_plot(plt, store: RunStore, rounds: list[dict[str, Any]], xs: list[int]) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    prompt = [r["prompt_tokens"] for r in rounds]
    completion = [r["completion_tokens"] for r in rounds]
    ax.bar(xs, prompt, label="prompt")
    ax.bar(xs, completion, bottom=prompt, label="completion")
    ax.set_xlabel("round")
    ax.set_ylabel("tokens")
    ax.set_ylim(bottom=0)
    ax.set_xticks(xs or [0])
    ax.set_title("tokens per round")
    ax.legend()
    fig.tight_layout()
    path = store.path(TOKENS_PLOT)
    fig.savefig(path)
    plt.close(fig)
    return path


def spend_plot(summary: dict[str, Any]) -> Optional[str]:
    """The plot of what the run spent: tokens.png (models), search.png (the search), None (nothing)."""
    run = summary["run"]
    if run.get("prompt_tokens", 0) + run.get("completion_tokens", 0) > 0:
        return TOKENS_PLOT
    if any(run.get("cost", {}).values()):
        return SEARCH_PLOT
    return None


def _search_plot(plt, store: RunStore, rounds: list[dict[str, Any]], xs: list[int]) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    ax.bar(xs, [r.get("cost", {}).get("expansions", 0) for r in rounds], label="expansions")
    ax.set_xlabel("round")
    ax.set_ylabel("search expansions")
    ax.set_ylim(bottom=0)
    ax.set_xticks(xs or [0])
    twin = ax.twinx()
    twin.plot(xs, [r.get("cost", {}).get("candidates", 0) for r in rounds], marker="o", color="C1",
              label="candidates")
    twin.set_ylabel("candidates")
    twin.set_ylim(bottom=0)
    ax.set_title("search spending per round")
    fig.legend(loc="upper right")
    fig.tight_layout()
    path = store.path(SEARCH_PLOT)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# markdown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def render_markdown(store: RunStore, summary: dict[str, Any]) -> str:
    config = store.config_data()
    run = summary["run"]
    proposer = config.get("proposer") or {}
    backend = proposer.get("backend") or {}
    guardian = config.get("guardian") or {}
    kind = proposer.get("kind") or ("llm" if backend else "search")
    model = f"{backend.get('kind')}:{backend.get('model')}" if backend else "-"
    out = [f"# stepforge run: {summary.get('name')}", ""]
    out.append(_table(["setting", "value"], [
        ["variant", summary.get("variant")],
        ["mode", summary.get("mode", "closed")],
        ["proposer", f"{kind} ({proposer.get('style', 'ir')} prompts), model {model}" if kind == "llm" else kind],
        ["guardian", guardian.get("kind", "rule") if config.get("variant") != "single" else "none (variant single)"],
        ["temperatures x n", f"{config.get('temperatures')} x {config.get('n')}"],
        ["granularity m", config.get("granularity")],
        ["max rounds", config.get("max_rounds")],
        ["seed", config.get("seed")],
        ["status", f"{summary['status']}: {summary.get('stop_reason') or '-'}"],
    ]))
    out += ["", f"## Result ({summary.get('mode', 'closed')} mode)", ""]
    out.append(_table(["tasks", "solved", "completion", "samples", "correct", "verifications", "prompt tokens",
                       "completion tokens", "wall s", "samples/s", "verifications/s"], [[
        run["tasks"], run["tasks_solved"], _pct(run["task_completion"]), run["samples"], run["correct_samples"],
        run["verifications"], run["prompt_tokens"], run["completion_tokens"], _f(run["wall_seconds"], 1),
        _f(run["samples_per_second"], 2), _f(run["verifications_per_second"], 2)]]))
    out += ["", "Prompt tokens count each request's prompt once (its n samples share it); "
                f"{_f(run['prompt_tokens_per_sample'], 1)} prompt and {_f(run['completion_tokens_per_sample'], 1)} "
                "completion tokens per sample.", ""]
    out += _repair_section(config, summary.get("repair") or {})
    out += ["## Tasks solved per round", ""]
    out.append(_table(["round", "steps", "samples", "correct", "new tasks solved", "solved (total)", "prompt tokens",
                       "completion tokens", "wall s"], [[
        r["round"], r["steps"], r.get("samples", 0), r.get("correct", 0), len(r["solved"]), r["solved_total"],
        r.get("prompt_tokens", 0), r.get("completion_tokens", 0), _f(r["seconds"], 1)] for r in summary["rounds"]]))
    if any(run.get("cost", {}).values()):
        out += ["", "The search spends expansions, not tokens; per round:", ""]
        out.append(_table(["round", "expansions", "generated", "candidates"], [[
            r["round"], *(_f(r.get("cost", {}).get(k, 0), 0) for k in ("expansions", "generated", "candidates"))]
            for r in summary["rounds"]]))
    spend = spend_plot(summary)
    out += ["", "![tasks solved](tasks_solved.png)" + (f" ![{spend[:-4]}]({spend})" if spend else ""), ""]
    out += ["## Steps (demonstration groups)", "",
            "Step j of a round shows the demonstrations E[0] + ... + E[j] (hardest first).", ""]
    out.append(_table(["round", "step", "demonstrations", "tasks sampled", "solved", "samples", "correct", "wall s"], [[
        s["round"], s["step"], ", ".join(s["demonstrations"]) or "(base knowledge only)", len(s["tasks"]),
        ", ".join(s["solved"]) or "-", s["samples"], s["correct"], _f(s["seconds"], 1)] for s in summary["steps"]]))
    out += ["", "## Per task group", ""]
    out.append(_table(["group", "mode", "tasks", "solved"],
                      [[g, v.get("mode", "closed"), v["tasks"], v["solved"]] for g, v in summary["groups"].items()]))
    out += [""] + F.render_families(summary) + ["![solved per family](families.png)"]
    out += ["", "## Per task", "",
            "pass@1 and pass@n use the unbiased estimator over the task's samples of one step (all temperatures); "
            "`round 0` is base knowledge only, `at solve` the step that solved it.", ""]
    rows = []
    for task, tm in summary["tasks"].items():
        r0 = next((p for p in tm["per_step"] if p["round"] == 0), None)
        at = None
        if tm.get("solved_at"):
            at = next((p for p in tm["per_step"] if [p["round"], p["step"]] == tm["solved_at"]), None)
        n0 = r0["n"] if r0 else 0
        rows.append([
            task, "yes" if tm.get("earned") else "no",
            f"r{tm['solved_at'][0]}.s{tm['solved_at'][1]}" if tm.get("solved_at") else "-",
            tm["samples"], tm["correct"],
            _f(r0["pass@1"]) if r0 else "-", _f(r0[f"pass@{n0}"]) if r0 else "-",
            _f(at["pass@1"]) if at else "-", _f(at[f"pass@{at['n']}"]) if at else "-",
            tm["prompt_tokens"], tm["completion_tokens"], _f(tm["seconds"], 1),
            ", ".join(f"{k} {v}" for k, v in tm["stages"].items()),
        ])
    out.append(_table(["task", "solved", "at", "samples", "correct", "round 0 pass@1", "round 0 pass@n",
                       "at solve pass@1", "at solve pass@n", "prompt tok", "completion tok", "seconds", "verdicts"],
                      rows))
    out += ["", "## Earned programs", ""]
    mi = summary["maintainability"]
    if summary["programs"]:
        out += [f"Mean maintainability index {_f(mi['mean_mi'], 1)} with comments, "
                f"{_f(mi['mean_mi_no_comments'], 1)} without (radon `mi_visit`).", ""]
    else:
        out += ["No task was solved, so no program was earned.", ""]
    seeded = summary.get("seeded") or []
    if seeded:
        out += [f"Seeded demonstrations ({len(seeded)}, from `seed_buffer`, not counted above): "
                f"{', '.join(seeded)}.", ""]
    for entry in store.load_buffer():
        if entry.source:
            continue
        p = summary["programs"].get(entry.task_key, {})
        out += [f"### {entry.task_key}", "",
                f"Earned in round {entry.round}, step {entry.step}, at temperature {entry.temperature:g}; "
                f"{entry.success_count}/{entry.n_samples} samples correct (success rate {entry.success_rate:.3f}); "
                f"{p.get('lines', '-')} lines; maintainability index {_f(p.get('mi'), 1)} "
                f"({_f(p.get('mi_no_comments'), 1)} without comments); demonstrations: "
                f"{', '.join(entry.demonstrations) or 'none'}.", "", "```python", entry.impl.rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def _repair_section(config: dict[str, Any], repair: dict[str, Any]) -> list[str]:
    """The per-turn table of a run with repair turns (nothing when it has none)."""
    if not config.get("repair_turns"):
        return []
    out = ["## Repair turns", "",
           f"Up to {config['repair_turns']} follow-up turn(s) per failed sample, each showing the proposer the "
           "verdict on its last answer. By turn t, a sample counts as correct when any of its turns up to t is.", ""]
    out.append(_table(["turn", "samples", "correct", "tasks solved (by this turn)", "pass@1", "pass@n", "tokens"], [[
        t["turn"], t["samples"], t["correct"], t["tasks_solved"], _f(t["pass@1"]), _f(t["pass@n"]), t["tokens"]]
        for t in repair.get("per_turn", [])]))
    solved = repair.get("tasks_solved_by_repair") or []
    out += ["", f"Tasks solved only by a repair turn: {', '.join(solved) or 'none'}. Tokens per solved task: "
                f"{_f(repair.get('tokens_per_solved_task'), 1)} with every turn, "
                f"{_f(repair.get('tokens_per_solved_task_first_turns'), 1)} counting first turns and the tasks "
                "they solved only.", ""]
    return out


def write_report(run_dir: str | Path, store: RunStore | None = None) -> dict[str, Any]:
    """summary.json, report.md and the plots; returns the summary."""
    from stepforge.loop.runstore import atomic_write_text

    store = store or RunStore.open(run_dir, lock=False)
    summary = build_summary(store)
    store.write_summary(summary)
    write_plots(store, summary)
    atomic_write_text(store.path(REPORT), render_markdown(store, summary))
    return summary


__all__ = ["PLOTS", "build_summary", "render_markdown", "write_plots", "write_report"]
