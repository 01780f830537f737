"""Metrics of a run (docs/design.md "Metrics"), computed from the run directory's records.

- pass@k per task with the unbiased estimator `1 - C(n-c, k) / C(n, k)`
  (n samples, c correct), in the numerically stable product form
  `1 - prod_{i=n-c+1}^{n} (1 - k / i)`; task completion = tasks with c > 0.
- prompt and completion tokens per sample, per task and per run. A request
  asks for n samples of one prompt, and every backend processes that prompt
  once, so run and task totals count each request's prompt once
  (`prompt_tokens`), while a sample record carries its prompt's size.
- wall time per task (the generation, guard and verification seconds of its
  samples) and per round (from the step records); samples and verifications
  per second (over the run's wall time, and per verifier-second).
- maintainability index (radon's `mi_visit`) of the earned programs, with
  their comments and with comments removed. A STeP program is a function
  body (it ends in `return`), so it is measured wrapped in `def impl(...)`.

Everything here is a pure function of plain dicts (the JSON lines of
samples.jsonl and steps.jsonl and the buffer entries), so the report can
recompute it from a run directory alone.
"""

from __future__ import annotations

import io
import math
import textwrap
import tokenize
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of the n samples (c correct) include a correct one."""
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 0, c >= 0, k >= 1; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples")
    if n == 0:
        return 0.0
    if k > n:
        k = n
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def task_completion(correct_by_task: Mapping[str, int]) -> float:
    """Fraction of tasks with at least one correct sample."""
    if not correct_by_task:
        return 0.0
    return sum(1 for c in correct_by_task.values() if c > 0) / len(correct_by_task)


# ---------------------------------------------------------------------------
# maintainability index


def strip_comments(code: str) -> str:
    """The program without `#` comments (and without lines left empty by them)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "\n".join(line.split("#", 1)[0].rstrip() for line in code.splitlines() if line.split("#", 1)[0].strip()) + "\n"
    kept = [t for t in tokens if t.type != tokenize.COMMENT]
    text = tokenize.untokenize(kept)
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip()) + "\n"


def _as_function(code: str, inputs: Sequence[str] = ()) -> str:
    args = ", ".join(inputs)
    return f"def impl({args}):\n" + textwrap.indent(code.rstrip() + "\n", "    ")


def maintainability(code: str, inputs: Sequence[str] = ()) -> dict[str, float | None]:
    """radon's maintainability index of a program, with and without comments (None if radon cannot parse it)."""
    from radon.metrics import mi_visit

    out: dict[str, float | None] = {}
    for label, text in (("mi", code), ("mi_no_comments", strip_comments(code))):
        try:
            out[label] = round(float(mi_visit(_as_function(text, inputs), multi=True)), 2)
        except (SyntaxError, ValueError, TypeError):
            out[label] = None
    return out


# ---------------------------------------------------------------------------
# aggregation over sample records


def request_key(rec: Mapping[str, Any]) -> tuple:
    """The request a sample came from: (round, step, task, temperature), plus (turn, index) for a repair turn."""
    from stepforge.loop.runstore import request_id

    return request_id(rec)


def _sum(values: Iterable[float]) -> float:
    return float(sum(values))


def task_metrics(samples: Sequence[Mapping[str, Any]], n_per_request: int | None = None) -> dict[str, dict[str, Any]]:
    """Per task: samples, correct, pass@1 / pass@n over all its samples and per (round, step), tokens, seconds."""
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in samples:
        by_task[rec["task"]].append(rec)
    out: dict[str, dict[str, Any]] = {}
    for task, recs in by_task.items():
        n = len(recs)
        c = sum(1 for r in recs if r.get("correct"))
        steps: dict[tuple[int, int], list[Mapping[str, Any]]] = defaultdict(list)
        temps: dict[float, list[Mapping[str, Any]]] = defaultdict(list)
        for r in recs:
            steps[(r["round"], r["step"])].append(r)
            temps[float(r["temperature"])].append(r)
        per_step = []
        for (rnd, step), group in sorted(steps.items()):
            gn, gc = len(group), sum(1 for r in group if r.get("correct"))
            per_step.append({"round": rnd, "step": step, "n": gn, "c": gc, "pass@1": pass_at_k(gn, gc, 1),
                             f"pass@{gn}": pass_at_k(gn, gc, gn)})
        per_temp = {
            f"{t:g}": {"n": len(g), "c": sum(1 for r in g if r.get("correct")),
                       "pass@1": pass_at_k(len(g), sum(1 for r in g if r.get("correct")), 1)}
            for t, g in sorted(temps.items())
        }
        first = min(((r["round"], r["step"]) for r in recs if r.get("correct")), default=None)
        prompts = {request_key(r): r.get("prompt_tokens", 0) for r in recs}
        out[task] = {
            "samples": n,
            "correct": c,
            "pass@1": pass_at_k(n, c, 1),
            "pass@n": pass_at_k(n, c, n),
            "solved_at": list(first) if first else None,
            "per_step": per_step,
            "per_temperature": per_temp,
            "prompt_tokens": int(sum(prompts.values())),
            "completion_tokens": int(sum(r.get("completion_tokens", 0) for r in recs)),
            "guard_prompt_tokens": int(sum(r.get("guard_prompt_tokens", 0) for r in recs)),
            "guard_completion_tokens": int(sum(r.get("guard_completion_tokens", 0) for r in recs)),
            "seconds": round(_sum(sum((r.get("timings") or {}).values()) for r in recs), 4),
            "stages": dict(sorted(_count(stage_of(r) for r in recs).items())),
        }
    return out


def stage_of(rec: Mapping[str, Any]) -> str:
    """The verdict stage of a sample record."""
    return ((rec.get("verdict") or {}).get("stage")) or "?"


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return dict(out)


def cost_totals(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The records' `cost` (what proposers without tokens spent, e.g. search expansions), summed by key."""
    total: dict[str, float] = defaultdict(float)
    for rec in records:
        for key, value in (rec.get("cost") or {}).items():
            total[key] += float(value)
    return {k: round(v, 4) for k, v in total.items()}


def round_metrics(samples: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round: steps, samples, correct, tasks solved (new), tokens, wall seconds."""
    rounds: dict[int, dict[str, Any]] = {}
    for st in steps:
        r = rounds.setdefault(st["round"], {"round": st["round"], "steps": 0, "solved": [], "seconds": 0.0})
        r["steps"] += 1
        r["solved"].extend(st.get("solved", []))
        r["seconds"] += float(st.get("seconds", 0.0))
    by_round: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in samples:
        by_round[rec["round"]].append(rec)
    for rnd in set(by_round) | set(rounds):
        r = rounds.setdefault(rnd, {"round": rnd, "steps": 0, "solved": [], "seconds": 0.0})
        recs = by_round.get(rnd, [])
        prompts = {request_key(x): x.get("prompt_tokens", 0) for x in recs}
        r.update({
            "samples": len(recs),
            "correct": sum(1 for x in recs if x.get("correct")),
            "prompt_tokens": int(sum(prompts.values())),
            "completion_tokens": int(sum(x.get("completion_tokens", 0) for x in recs)),
            "guard_tokens": int(sum(x.get("guard_prompt_tokens", 0) + x.get("guard_completion_tokens", 0) for x in recs)),
            "cost": cost_totals(recs),
        })
        r["seconds"] = round(r["seconds"], 4)
    ordered = [rounds[k] for k in sorted(rounds)]
    total = 0
    for r in ordered:
        total += len(r["solved"])
        r["solved_total"] = total
    return ordered


def run_metrics(samples: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], n_tasks: int,
                wall_seconds: float | None = None) -> dict[str, Any]:
    """Run totals: samples, verifications, tokens, completion, throughput."""
    n = len(samples)
    correct_by_task: dict[str, int] = defaultdict(int)
    for rec in samples:
        correct_by_task[rec["task"]] += 1 if rec.get("correct") else 0
    verified = [r for r in samples if r.get("verified")]
    prompts = {request_key(r): r.get("prompt_tokens", 0) for r in samples}
    prompt_tokens = int(sum(prompts.values()))
    completion_tokens = int(sum(r.get("completion_tokens", 0) for r in samples))
    verify_seconds = _sum((r.get("timings") or {}).get("verify_s", 0.0) for r in samples)
    generate_seconds = _sum((r.get("timings") or {}).get("generate_s", 0.0) for r in samples)
    wall = wall_seconds if wall_seconds is not None else _sum(float(s.get("seconds", 0.0)) for s in steps)
    solved = sum(1 for c in correct_by_task.values() if c > 0)
    return {
        "tasks": n_tasks,
        "tasks_solved": solved,
        "task_completion": solved / n_tasks if n_tasks else 0.0,
        "samples": n,
        "correct_samples": sum(1 for r in samples if r.get("correct")),
        "verifications": len(verified),
        "requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "guard_prompt_tokens": int(sum(r.get("guard_prompt_tokens", 0) for r in samples)),
        "guard_completion_tokens": int(sum(r.get("guard_completion_tokens", 0) for r in samples)),
        "prompt_tokens_per_sample": (sum(r.get("prompt_tokens", 0) for r in samples) / n) if n else 0.0,
        "completion_tokens_per_sample": completion_tokens / n if n else 0.0,
        "wall_seconds": round(wall, 4),
        "samples_per_second": n / wall if wall > 0 else 0.0,
        "verifications_per_second": len(verified) / wall if wall > 0 else 0.0,
        "verifications_per_verifier_second": len(verified) / verify_seconds if verify_seconds > 0 else 0.0,
        "generate_seconds": round(generate_seconds, 4),
        "verify_seconds": round(verify_seconds, 4),
    }


def _tokens(recs: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens (each request once) plus completion tokens."""
    prompts = {request_key(r): r.get("prompt_tokens", 0) for r in recs}
    return int(sum(prompts.values()) + sum(r.get("completion_tokens", 0) for r in recs))


def repair_metrics(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Repair turns: per turn t, pass@1 / pass@n with a sample chain (a first answer and its follow-ups)
    counted correct when any of its turns up to t is; tasks solved by turn t; tasks solved only by a
    repair turn; tokens per solved task with every turn, and with the first turns alone."""
    chains: dict[tuple, dict[int, bool]] = defaultdict(dict)
    for r in samples:
        chain = chains[(r["round"], r["step"], r["task"], r["temperature"], r["index"])]
        turn = int(r.get("turn", 0) or 0)
        chain[turn] = chain.get(turn, False) or bool(r.get("correct"))
    last = max((int(r.get("turn", 0) or 0) for r in samples), default=0)
    by_task: dict[str, list[dict[int, bool]]] = defaultdict(list)
    for (_, _, task, _, _), chain in chains.items():
        by_task[task].append(chain)
    per_turn = []
    for t in range(last + 1):
        at = [r for r in samples if int(r.get("turn", 0) or 0) == t]
        p1, pn, solved = [], [], 0
        for task_chains in by_task.values():
            n = len(task_chains)
            c = sum(1 for ch in task_chains if any(ok for k, ok in ch.items() if k <= t))
            p1.append(pass_at_k(n, c, 1))
            pn.append(pass_at_k(n, c, n))
            solved += 1 if c else 0
        per_turn.append({"turn": t, "samples": len(at), "correct": sum(1 for r in at if r.get("correct")),
                         "tasks_solved": solved, "pass@1": mean(p1) or 0.0, "pass@n": mean(pn) or 0.0,
                         "tokens": _tokens(at)})
    first = [r for r in samples if not r.get("turn")]
    solved_all = {r["task"] for r in samples if r.get("correct")}
    solved_first = {r["task"] for r in first if r.get("correct")}
    by_repair = sorted(solved_all - solved_first)
    return {
        "turns": last,
        "per_turn": per_turn,
        "tasks_solved_by_repair": by_repair,
        "tokens_per_solved_task": _tokens(samples) / len(solved_all) if solved_all else None,
        "tokens_per_solved_task_first_turns": _tokens(first) / len(solved_first) if solved_first else None,
    }


def program_metrics(entries: Sequence[Mapping[str, Any]], inputs_by_task: Mapping[str, Sequence[str]] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Per earned program: lines and maintainability index with and without comments (of an open
    candidate's impl; its fns are YAML around model-written bodies)."""
    from stepforge.loop.candidates import candidate_impl

    out = {}
    for e in entries:
        code = candidate_impl(e["impl"])
        lines = [ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        mi = maintainability(code, (inputs_by_task or {}).get(e["task_key"], ()))
        out[e["task_key"]] = {"lines": len(lines), **mi, "mode": e.get("mode", "closed")}
    return out


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-None values, None when there are none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


__all__ = [
    "maintainability",
    "mean",
    "pass_at_k",
    "program_metrics",
    "repair_metrics",
    "request_key",
    "round_metrics",
    "run_metrics",
    "strip_comments",
    "task_completion",
    "task_metrics",
]
