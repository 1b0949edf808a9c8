"""Where the laptop pipeline's wall time goes: each stage's wall, compute and orchestration overhead.

    python benchmarks/pipeline_wall.py                        # the laptop preset, fresh work dir, seed 0
    python benchmarks/pipeline_wall.py --seed 1               # another seed (the spread of the figures)
    python benchmarks/pipeline_wall.py --work-dir DIR         # reads DIR's newest pipeline run if it has one
    python benchmarks/pipeline_wall.py --set fc_rl.max_steps=2

It runs ``foresight run --preset laptop`` (the command ``make run`` runs: ephemeral Prefect, a local Ray,
MLflow on sqlite) as a subprocess in a fresh work dir, so that no stage is reused, and times it from the
process start to its exit. Then it reads the MLflow runs that the pipeline recorded:
- wall: the stage's Prefect task, end to end (``<stage>.wall_s`` on the pipeline run): reuse checks, Ray
  job start, model download and upload, the work itself;
- compute: the stage function alone (``compute_s`` that the worker logs around ``run_sft`` /
  ``train_fc_rl`` / the eval actors' play; the corpus's plan + collect time from its manifest);
- overhead: wall - compute (Prefect, Ray, MLflow, model download, upload and the eval actors' model load),
  and for the whole run the process's wall time minus the stages' compute, as a share of the run and of
  the budget (target: at most 10% of the 20 minutes);
- tokens/s: trained tokens (WM-AMT, FE-SFT), generated rollout tokens (FC-RL), generated tokens (eval).
The total is printed against the budget (20 minutes) with the CPU type and dtype it ran on: figures
compare only within one machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.progress import clock  # m:ss, as the run's own summary prints it

STAGES = ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval")


def stage_rows(tracking_uri: str) -> tuple[dict[str, dict[str, float]], str]:
    """``({stage: {wall, compute, tok_s}}, pipeline run id)`` of the newest pipeline run in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, filter_string="tags.`foresight.stage` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit(f"no pipeline run in {tracking_uri}")
    parent = parents[0]
    children = client.search_runs(exps, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {r.data.tags.get("foresight.stage"): r for r in children}
    rows: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        wall = parent.data.metrics.get(f"{stage}.wall_s")
        run = by_stage.get(stage)
        if wall is None:
            continue
        m = run.data.metrics if run is not None else {}
        row = {"wall": wall, "reused": run is not None and run.data.tags.get("foresight.reused") == "true"}
        if stage == "corpus":
            row["compute"] = m.get("corpus.timing.plan_s", 0.0) + m.get("corpus.timing.collect_s", 0.0)
        else:
            row["compute"] = m.get("compute_s", float("nan"))
        if stage in ("wm_amt", "fe_sft"):
            row["tok_s"] = m.get("train_tokens_per_s", float("nan"))
            row["tok_kind"] = "trained"
        elif stage == "fc_rl" and run is not None:
            hist = client.get_metric_history(run.info.run_id, "perf/rollout_tokens_per_s")
            row["tok_s"] = sum(h.value for h in hist) / len(hist) if hist else float("nan")
            row["tok_kind"] = "rollout"
        elif stage == "eval":
            tokens = sum(m[k] * m.get(k.replace("/gen_tokens", "/episodes"), 0.0)
                         for k in m if k.endswith("/gen_tokens") and not k.startswith("avg/"))
            row["tok_s"] = tokens / row["compute"] if row["compute"] else float("nan")
            row["tok_kind"] = "generated"
        if run is not None and "foresight.worker.torch_threads" in run.data.tags:
            row["threads"] = run.data.tags["foresight.worker.torch_threads"]
        rows[stage] = row
    return rows, parent.info.run_id


def report(rows: dict[str, dict[str, float]], total_s: float | None, budget_s: float) -> str:
    lines = [f"{'stage':8} {'wall':>6} {'compute':>8} {'overhead':>9} {'share':>6} {'tokens/s':>16} threads"]
    for stage, r in rows.items():
        over = r["wall"] - r["compute"]
        tok = f"{r['tok_s']:.0f} {r['tok_kind']}" if "tok_s" in r else "-"
        lines.append(f"{stage:8} {clock(r['wall']):>6} {clock(r['compute']):>8} {clock(max(over, 0)):>9} "
                     f"{over / r['wall']:>6.0%} {tok:>16} {r.get('threads', '-')}"
                     + ("  (reused)" if r["reused"] else ""))
    walls = sum(r["wall"] for r in rows.values())
    compute = sum(r["compute"] for r in rows.values())
    lines.append(f"{'stages':8} {clock(walls):>6} {clock(compute):>8} {clock(walls - compute):>9} "
                 f"{(walls - compute) / walls:>6.0%}")
    if total_s is not None:
        outside = total_s - walls
        lines.append(f"whole run (process start to exit): {clock(total_s)}; outside the stages (imports, Prefect, "
                     f"MLflow set-up): {clock(outside)}")
        lines.append(f"orchestration overhead (whole run - compute): {clock(total_s - compute)} = "
                     f"{(total_s - compute) / total_s:.0%} of the run, {(total_s - compute) / budget_s:.0%} of the "
                     f"budget (target: <= 10% of the budget)")
        verdict = "within" if total_s <= budget_s else "OVER"
        lines.append(f"total {clock(total_s)} against the {clock(budget_s)} budget: {verdict} "
                     f"({total_s / budget_s:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", help="default: a fresh temporary folder (nothing reused)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--budget-min", type=float, default=20.0)
    ap.add_argument("--read-only", action="store_true", help="only read --work-dir's newest pipeline run")
    a = ap.parse_args(argv)

    import torch

    from foresight_core.config import load_config
    from foresight_core.models import compute_dtype, cpu_type

    work = Path(a.work_dir or tempfile.mkdtemp(prefix=f"foresight-wall-{a.preset}-")).resolve()
    cfg = load_config(a.preset, overrides=[f"work_dir={work}", f"seed={a.seed}", *a.overrides], env={})
    print(f"# pipeline_wall: preset {a.preset}, seed {a.seed}, work dir {work}")
    print(f"# CPU: {cpu_type()}; compute dtype {str(compute_dtype(cfg.model)).removeprefix('torch.')}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    total = None
    if not a.read_only:
        exe = Path(sys.executable).with_name("foresight")
        cmd = [str(exe), "run", "--preset", a.preset, "--set", f"work_dir={work}", "--set", f"seed={a.seed}"]
        for o in a.overrides:
            cmd += ["--set", o]
        print("# " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        total = time.perf_counter() - t0
        if rc != 0:
            print(f"foresight run exited {rc} after {clock(total)}", file=sys.stderr)
            return rc
    rows, run_id = stage_rows(cfg.infra.tracking.tracking_uri or f"sqlite:///{work}/mlflow.db")
    print(f"\n# pipeline run {run_id}")
    print(report(rows, total, a.budget_min * 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
