"""The ablation table as evidence: rows x seeds of evaluations -> means with intervals and paired differences.

    runs = [RowRun("full", 0, metrics, task_scores), RowRun("full", 1, ...), RowRun("sft_rl", 0, ...), ...]
    rows = evidence_table(runs, variants)            # one dict per row, per benchmark, JSON-ready
    print(table_markdown(rows))                       # a section per benchmark, then test-time planning

Each ``RowRun`` is one evaluation: the eval run's flat metrics (``<benchmark>/<mode>/<column>``), its
per-task scores (``{mode: {"<benchmark>/<task id>": mean score over the task's samples}}``) and its
episodes' first stated confidences (``{mode: {benchmark: [[task id, q, success], ...]}}``).

Per benchmark and row:
- the task score (EM for search, verified for maths; mean@k) as mean and 95% interval, the two-way
  bootstrap over tasks and seeds (``metrics.seeds_tasks_interval``);
- the paired difference against the reference row (the full method) on the same (seed, task) cells,
  with its interval;
- ECE, Brier and AUROC of the first stated q pooled over the row's seeds (every episode of every seed that
  stated one, ``RowRun.calibration``), with ``n_q``, how many episodes they rest on; runs logged without
  their pairs fall back to the mean over seeds;
- the other columns (F1, pass@k, format, grounding, tokens) as the mean over seeds;
- the token overhead of foresight: tokens per episode against the row's ``plain_twin`` (the same
  recipe without world-model spans), as a ratio - 1.
Test-time planning, per row that ran it: best-of-K by stated confidence against greedy and against a
random pick among the same K candidates (paired), and the K-candidate token cost against greedy. A gain
is claimed only where the interval of (planning - random-of-K) lies above 0.

Pure: imports no Ray, Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core.metrics import seeds_tasks_interval
from foresight_core.scoring import calibration

COLUMNS = ("f1", "pass_at_k", "format_rate", "ece_first", "brier_first", "auroc_first", "n_q", "grounding_rate",
           "gen_tokens")
"""Eval metrics shown per benchmark: the calibration ones pooled over seeds, the others as the mean over
seeds (the score gets an interval)."""
HEADERS = {"f1": "F1", "pass_at_k": "pass@k", "format_rate": "format", "ece_first": "ECE", "brier_first": "Brier",
           "auroc_first": "AUROC", "n_q": "n(q)", "grounding_rate": "grounding", "gen_tokens": "tokens/ep"}


@dataclass
class RowRun:
    """One evaluation of one row at one seed."""

    variant: str
    seed: int
    metrics: Mapping[str, float]
    task_scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    calibration: Mapping[str, Mapping[str, Sequence[Sequence[Any]]]] | None = None
    """``{mode: {benchmark: [[task id, first q, success], ...]}}``; None: the run did not log them (its seed's
    ECE / Brier / AUROC metrics are used instead)."""


@dataclass
class RowSpec:
    """What the table needs to know of a variant."""

    name: str
    paper_row: str = ""
    changes: str = ""
    plain_twin: str | None = None


def _interval(values: Mapping[tuple[int, str], float], n_boot: int, level: float) -> dict[str, float] | None:
    if not values:
        return None
    mean, lo, hi = seeds_tasks_interval(values, n_boot=n_boot, level=level)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def _cells(runs: Sequence[RowRun], mode: str, bench: str) -> dict[tuple[int, str], float]:
    """(seed, task id) -> score of ``bench`` in ``mode`` over a row's runs."""
    prefix = f"{bench}/"
    return {(r.seed, k[len(prefix):]): float(v) for r in runs for k, v in r.task_scores.get(mode, {}).items()
            if k.startswith(prefix)}


def _paired(a: Mapping[tuple[int, str], float], b: Mapping[tuple[int, str], float], n_boot: int,
            level: float) -> dict[str, float] | None:
    common = set(a) & set(b)
    return _interval({k: a[k] - b[k] for k in common}, n_boot, level) if common else None


def _seed_mean(runs: Sequence[RowRun], key: str) -> float | None:
    vals = [float(r.metrics[key]) for r in runs if key in r.metrics]
    return sum(vals) / len(vals) if vals else None


def pooled_pairs(runs: Sequence[RowRun]) -> dict[str, dict[str, list[Sequence[Any]]]]:
    """``{mode: {benchmark: [[task id, q, success], ...]}}`` of every run in ``runs`` (a row's seeds) put
    together: what the row's pooled ECE, Brier, AUROC and plots are computed from."""
    out: dict[str, dict[str, list[Sequence[Any]]]] = {}
    for r in runs:
        for mode, by_bench in (r.calibration or {}).items():
            for bench, pairs in by_bench.items():
                out.setdefault(mode, {}).setdefault(bench, []).extend(pairs)
    return out


def pooled_calibration(pairs: Sequence[Sequence[Any]]) -> dict[str, float | None]:
    """ECE, Brier and AUROC of ``[[task id, q, success], ...]``, and their count ``n_q``; None where undefined
    (no pair; AUROC with one outcome only)."""
    cal = calibration([float(p[1]) for p in pairs], [float(p[2]) for p in pairs])
    return {**{f"{k}_first": v for k, v in cal.items()}, "n_q": float(len(pairs))}


def benchmarks(runs: Sequence[RowRun]) -> list[str]:
    """Benchmarks any run scored, in first-seen order."""
    seen: dict[str, None] = {}
    for r in runs:
        for scores in r.task_scores.values():
            for k in scores:
                seen.setdefault(k.split("/", 1)[0], None)
    return list(seen)


def evidence_table(runs: Sequence[RowRun], specs: Sequence[RowSpec], reference: str = "full",
                   n_boot: int = 2000, level: float = 0.95) -> list[dict[str, Any]]:
    """One JSON-ready dict per row (in ``specs`` order): its name, paper row, what it changes, seeds, and per
    benchmark ``{score, vs_reference, <COLUMNS>, token_overhead, planning}`` (see the module docstring)."""
    by_row: dict[str, list[RowRun]] = {s.name: [] for s in specs}
    for r in runs:
        if r.variant not in by_row:
            raise ValueError(f"run of unknown variant {r.variant!r} (rows: {sorted(by_row)})")
        by_row[r.variant].append(r)
    benches = benchmarks(runs)
    ref_runs = by_row.get(reference, [])
    out = []
    for spec in specs:
        mine = by_row[spec.name]
        row: dict[str, Any] = {"variant": spec.name, "paper_row": spec.paper_row, "changes": spec.changes,
                               "seeds": sorted({r.seed for r in mine}), "benchmarks": {}}
        pooled = pooled_pairs(mine) if mine and all(r.calibration is not None for r in mine) else None
        for bench in benches:
            direct = _cells(mine, "direct", bench)
            if not direct:
                continue
            b: dict[str, Any] = {"score": _interval(direct, n_boot, level)}
            if spec.name != reference and ref_runs:
                b["vs_reference"] = _paired(direct, _cells(ref_runs, "direct", bench), n_boot, level)
            for col in COLUMNS:
                b[col] = _seed_mean(mine, f"{bench}/direct/{col}")
            if pooled is not None:  # pooled over seeds (runs logged without their pairs: seed means)
                b.update(pooled_calibration(pooled.get("direct", {}).get(bench, [])))
            twin = by_row.get(spec.plain_twin or "", [])
            mine_tokens, twin_tokens = b["gen_tokens"], _seed_mean(twin, f"{bench}/direct/gen_tokens")
            b["token_overhead"] = (mine_tokens / twin_tokens - 1.0) if mine_tokens and twin_tokens else None
            planning, chance = _cells(mine, "planning", bench), _cells(mine, "planning_random", bench)
            if planning:
                cand = _seed_mean(mine, f"{bench}/planning/candidate_tokens")
                vs_random = _paired(planning, chance, n_boot, level)
                b["planning"] = {
                    "score": _interval(planning, n_boot, level),
                    "random_score": _interval(chance, n_boot, level),
                    "vs_direct": _paired(planning, direct, n_boot, level),
                    "vs_random": vs_random,
                    "token_cost": (cand / mine_tokens) if cand and mine_tokens else None,
                    "gain_claimed": bool(vs_random and vs_random["lo"] > 0),
                }
            row["benchmarks"][bench] = b
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _ci(x: Mapping[str, float] | None, signed: bool = False) -> str:
    if not x:
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x['mean'])} [{f.format(x['lo'])}, {f.format(x['hi'])}]"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "" if x is None else fmt.format(x)


def table_markdown(rows: Sequence[Mapping[str, Any]], reference: str = "full", level: float = 0.95) -> str:
    """A section per benchmark (score with its interval, the paired difference against ``reference``, the
    other columns), then test-time planning where a row ran it."""
    benches: list[str] = []
    for r in rows:
        benches += [b for b in r["benchmarks"] if b not in benches]
    pct = f"{level:.0%}"
    lines: list[str] = []
    for bench in benches:
        lines += [f"### {bench}", "",
                  f"| row | paper row | seeds | score [{pct} CI] | vs {reference} [{pct} CI] | "
                  + " | ".join(HEADERS[c] for c in COLUMNS) + " | token overhead |",
                  "|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
        for r in rows:
            b = r["benchmarks"].get(bench)
            if b is None:
                continue
            cells = [_num(b.get(c), {"gen_tokens": "{:.1f}", "n_q": "{:.0f}"}.get(c, "{:.3f}")) for c in COLUMNS]
            lines.append(f"| {r['variant']} | {r['paper_row']} | {len(r['seeds'])} | {_ci(b['score'])} | "
                         f"{_ci(b.get('vs_reference'), signed=True)} | " + " | ".join(cells)
                         + f" | {_num(b.get('token_overhead'), '{:+.1%}')} |")
        lines.append("")
    planned = [(r, bench, r["benchmarks"][bench]["planning"]) for r in rows for bench in r["benchmarks"]
               if r["benchmarks"][bench].get("planning")]
    if planned:
        lines += ["### test-time planning (best-of-K by stated confidence)", "",
                  f"| row | benchmark | greedy | best-of-K by q | random-of-K | q - random [{pct} CI] | "
                  f"q - greedy [{pct} CI] | tokens vs greedy | gain claimed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, bench, p in planned:
            greedy = r["benchmarks"][bench]["score"]
            lines.append(f"| {r['variant']} | {bench} | {_num(greedy and greedy['mean'])} | "
                         f"{_num(p['score'] and p['score']['mean'])} | "
                         f"{_num(p['random_score'] and p['random_score']['mean'])} | {_ci(p['vs_random'], True)} | "
                         f"{_ci(p['vs_direct'], True)} | {_num(p['token_cost'], '{:.1f}x')} | "
                         f"{'yes' if p['gain_claimed'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
