"""Results per task family (group) and per mode, for one run and across runs.

- `family_summary(summary, mode)`: per group of a run's summary: tasks,
  solved, mean round-0 pass@1, and solved/tasks per difficulty
  (benchmark/selection.py), with the run's mode (config `mode`, default
  closed). `build_summary` stores it as `families`.
- `render_families(summary)`: the run report's "Per family and mode" section.
- `compare_runs(run_dirs, out)` (`stepforge report RUN... --compare DIR`):
  what each run (the search baseline, each model, each mode) solved per
  family, as DIR/families.md and DIR/families.png (solved fraction per
  family, one bar per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from stepforge.config_io import read_mapping

DIFFICULTIES = ("easy", "medium", "hard")
COMPARE_MD = "families.md"
COMPARE_PLOT = "families.png"


def _difficulties(keys: Sequence[str]) -> dict[str, str | None]:
    try:
        from stepforge.benchmark.schema import load_benchmark
        from stepforge.benchmark.selection import task_difficulty

        tasks = load_benchmark()
    except Exception:  # noqa: BLE001 - the report works without the benchmark
        return {}
    return {k: task_difficulty(tasks[k]) for k in keys if k in tasks}


def family_summary(summary: dict[str, Any], mode: str = "closed") -> dict[str, dict[str, Any]]:
    """Per group: tasks, solved, round-0 pass@1 (mean), per difficulty [solved, tasks], mode."""
    tasks = summary["tasks"]
    level = _difficulties(list(tasks))
    out: dict[str, dict[str, Any]] = {}
    for key, tm in tasks.items():
        group = key.split("/", 1)[0] if "/" in key else "(none)"
        row = out.setdefault(group, {"mode": mode, "tasks": 0, "solved": 0, "round0_pass@1": 0.0,
                                     "difficulty": {d: [0, 0] for d in DIFFICULTIES}})
        solved = bool(tm.get("earned"))
        r0 = next((p for p in tm.get("per_step", []) if p["round"] == 0), None)
        row["tasks"] += 1
        row["solved"] += solved
        row["round0_pass@1"] += r0["pass@1"] if r0 else 0.0
        d = level.get(key)
        if d in row["difficulty"]:
            row["difficulty"][d][0] += solved
            row["difficulty"][d][1] += 1
    for row in out.values():
        row["round0_pass@1"] = round(row["round0_pass@1"] / row["tasks"], 6) if row["tasks"] else 0.0
    return dict(sorted(out.items()))


def _frac(pair: Sequence[int]) -> str:
    return f"{pair[0]}/{pair[1]}" if pair[1] else "-"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render_families(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: per family (with difficulty) and per mode."""
    fams = summary.get("families") or {}
    out = ["## Per family and mode", "",
           "Difficulty is derived from each task's reference program (docs/task-format.md); "
           "cells are solved/tasks.", ""]
    out += _table(["family", "mode", "tasks", "solved", "round 0 pass@1"] + list(DIFFICULTIES), [
        [g, r["mode"], r["tasks"], r["solved"], f"{r['round0_pass@1']:.3f}"] + [_frac(r["difficulty"][d]) for d in DIFFICULTIES]
        for g, r in fams.items()])
    modes: dict[str, list[int]] = {}
    for r in fams.values():
        m = modes.setdefault(r["mode"], [0, 0])
        m[0] += r["solved"]
        m[1] += r["tasks"]
    out += [""] + _table(["mode", "tasks", "solved"], [[m, v[1], v[0]] for m, v in modes.items()]) + [""]
    return out


# ---------------------------------------------------------------------------
# across runs


def run_label(config: dict[str, Any], fallback: str) -> str:
    """`search` or the model's name, with the mode: what a column of the comparison is."""
    proposer = config.get("proposer") or {}
    backend = proposer.get("backend") or {}
    kind = proposer.get("kind") or ("llm" if backend else "search")
    who = Path(str(backend["model"])).name if kind == "llm" and backend.get("model") else kind
    if backend.get("lora_path"):
        who += "+lora"
    return f"{config.get('name') or fallback}: {who} ({config.get('mode') or 'closed'})"


def _load(run_dir: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    from stepforge.loop.reporting.report import write_report

    summary = write_report(run_dir)
    config = read_mapping(run_dir / "config.yaml")
    return run_label(config, run_dir.name), summary["families"]


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """DIR/families.md (+ .png, + families.json): solved per family for each run; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [_load(Path(d)) for d in run_dirs]
    labels = [label for label, _ in runs]
    families = sorted({g for _, fams in runs for g in fams})
    rows = [[g] + [_frac([f[g]["solved"], f[g]["tasks"]]) if g in f else "-" for _, f in runs] for g in families]
    totals = ["all"] + [_frac([sum(r["solved"] for r in f.values()), sum(r["tasks"] for r in f.values())]) for _, f in runs]
    by_level = [[d] + [_frac([sum(r["difficulty"][d][0] for r in f.values()), sum(r["difficulty"][d][1] for r in f.values())])
                       for _, f in runs] for d in DIFFICULTIES]
    lines = ["# Solved per family", "", "Each column is one run (name: proposer or model (mode)); cells are solved/tasks.", ""]
    lines += _table(["family"] + labels, rows + [totals])
    lines += ["", "## Per difficulty", ""] + _table(["difficulty"] + labels, by_level)
    lines += ["", f"![solved per family]({COMPARE_PLOT})", ""]
    path = out / COMPARE_MD
    path.write_text("\n".join(lines), encoding="utf-8")
    (out / "families.json").write_text(json.dumps({label: fams for label, fams in runs}, indent=2) + "\n")
    plot_families(out / COMPARE_PLOT, families, runs)
    return path


def plot_families(path: Path, families: list[str], runs: list[tuple[str, dict]]) -> None:
    """Bars: solved fraction per family, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(families) + 2), 3.8), dpi=120)
    width = 0.8 / max(1, len(runs))
    for i, (label, fams) in enumerate(runs):
        ys = [fams[g]["solved"] / fams[g]["tasks"] if g in fams and fams[g]["tasks"] else 0.0 for g in families]
        ax.bar([x + i * width for x in range(len(families))], ys, width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(families))])
    ax.set_xticklabels(families, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("tasks solved (fraction)")
    ax.set_title("solved per family")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["COMPARE_MD", "COMPARE_PLOT", "compare_runs", "family_summary", "plot_families", "render_families", "run_label"]
