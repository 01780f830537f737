"""The ablation's outputs: a markdown table, a CSV file and a bar plot of the arms."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

TABLE_COLUMNS = ("arm", "model", "variant", "tasks", "solved", "completion", "pass@1", "pass@n", "samples",
                 "prompt_tokens", "completion_tokens", "wall_seconds", "solved_by_repair", "status")


def render_markdown(name: str, rows: list[dict[str, Any]], split: dict[str, list[str]], n: int,
                    temperatures: list[float], adapter: Optional[Path]) -> str:
    lines = [f"# Ablation {name}: SFT vs in-context self-improvement", "",
             f"Test tasks ({len(split['test'])}): {', '.join(split['test'])}",
             f"Train tasks ({len(split['train'])}): {', '.join(split['train']) or '-'}",
             f"Budget per arm: n = {n} samples per task and temperature, temperatures {temperatures}; "
             f"pass@1 and pass@n (k = {n}) over each task's round-0 samples, mean over test tasks.",
             f"Adapter: {adapter or '-'}", ""]
    headers = list(TABLE_COLUMNS)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(" --- " for _ in headers) + "|")
    for r in rows:
        cells = []
        for h in headers:
            v = r[h]
            if h == "solved":
                v = f"{r['solved']}/{r['tasks']}"
            elif isinstance(v, float):
                v = f"{v:.3f}" if h != "wall_seconds" else f"{v:.1f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in TABLE_COLUMNS})
    path.write_text(buf.getvalue(), encoding="utf-8")


def write_plot(path: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """Bars per arm: tasks solved (left), round-0 pass@1 and pass@n (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r["arm"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = left.bar(arms, [r["solved"] for r in rows], color="tab:blue")
    left.bar_label(bars, labels=[f"{r['solved']}/{r['tasks']}" for r in rows])
    left.set_ylim(0, 1.15 * max([r["tasks"] for r in rows] + [1]))
    left.set_ylabel("test tasks solved")
    left.set_title("tasks solved")
    xs = list(range(len(arms)))
    for offset, key in ((-0.2, "pass@1"), (0.2, "pass@n")):
        bars = right.bar([x + offset for x in xs], [r[key] for r in rows], width=0.4, label=key)
        right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_xticks(xs, arms)
    right.set_ylim(0, 1.1)
    right.set_title("round 0, mean over test tasks")
    right.legend()
    fig.suptitle(f"{name}: SFT vs in-context self-improvement")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
