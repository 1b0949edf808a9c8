"""Benchmark of stage 0 (corpus construction): speed, Monte Carlo cost and q-label calibration.

    python benchmarks/corpus.py                          # laptop preset, one process per core
    python benchmarks/corpus.py --preset tiny --workers 1 --fresh 2
    python benchmarks/corpus.py --set corpus.mc_rollouts=32

It builds the corpus from scratch into a temporary folder (never reusing one), with the
collection spread over a process pool (``--workers``; the Prefect flow uses Ray Data for the same
``collect_items`` batches), then plays ``--fresh`` new rollouts of the behaviour policy from every
labelled state and compares them with the q labels. Printed:

- build time (plan / collect / write) and trajectories per second;
- the cost of Monte Carlo annotation: its share of collection time and re-rollouts per second;
- calibration of q_t: ECE, Brier and reliability bins, overall and per environment;
- the targets (laptop: build < 120 s, ECE < 0.05), met or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

from foresight_core.config import PipelineConfig, load_config
from foresight_core.corpus import (CollectStats, batches_by_task, calibration_pairs, collect_items, plan_corpus,
                                   summarize_calibration, write_corpus)

TARGET_BUILD_S = 120.0
TARGET_ECE = 0.05


# ---------------------------------------------------------------------------------------------
# work done in the pool's processes (module level, so it pickles)

def _collect(args: tuple[list[dict[str, Any]], PipelineConfig]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    items, cfg = args
    stats = CollectStats()
    return collect_items(items, cfg, stats), dataclasses.asdict(stats)


def _pairs(args: tuple[list[dict[str, Any]], PipelineConfig, int]) -> list[dict[str, Any]]:
    rows, cfg, fresh = args
    return calibration_pairs(rows, cfg, fresh)


def _chunks(batches: list[list[Any]], n: int) -> list[list[Any]]:
    """``batches`` dealt round-robin into ``n`` chunks of whole batches (for load balance)."""
    out: list[list[Any]] = [[] for _ in range(n)]
    for i, b in enumerate(batches):
        out[i % n].extend(b)
    return [c for c in out if c]


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fresh", type=int, default=4, help="fresh rollouts per labelled state for calibration")
    args = ap.parse_args()

    out = tempfile.mkdtemp(prefix="foresight-bench-corpus-")
    cfg = load_config(args.preset, overrides=[f"work_dir={out}", *args.overrides])
    c = cfg.corpus
    print(f"corpus benchmark: preset {cfg.name}, {os.cpu_count()} cores, {args.workers} worker process(es)")
    print(f"  train tasks/env {c.n_train_tasks}, rollouts/task {c.rollouts_per_task}, N (mc_rollouts) "
          f"{c.mc_rollouts}, annotate_share {c.annotate_share}, q_label {c.q_label}")

    # 1. build: plan -> collect (pool) -> write
    t0 = time.perf_counter()
    plan = plan_corpus(cfg)
    t1 = time.perf_counter()
    # one task per batch (its rollouts share memo tables), batches dealt over the workers
    chunks = _chunks([[b] for b in batches_by_task(plan.items)], args.workers * 4)
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        results = pool.map(_collect, [([it for b in ch for it in b], cfg) for ch in chunks], chunksize=1)
        t2 = time.perf_counter()
        rows = [r for rs, _ in results for r in rs]
        stats = CollectStats()
        for _, s in results:
            stats.add(CollectStats(**s))
        manifest = write_corpus(rows, plan, cfg, out + "/corpus", timing={"collect_s": t2 - t1})
        t3 = time.perf_counter()

        # 2. calibration: fresh rollouts from every labelled state, in the same pool
        labelled = [r for r in rows if r["kind"] == "trajectory" and r["trajectory"]["meta"]["q_labels"]]
        by_item: dict[int, list[dict[str, Any]]] = {}
        for r in labelled:  # states of one task stay in one chunk (deduplication is per chunk)
            by_item.setdefault(r["trajectory"]["meta"]["item"] // c.rollouts_per_task, []).append(r)
        cal_chunks = _chunks(list(by_item.values()), args.workers * 4)
        pairs = [p for ps in pool.map(_pairs, [(ch, cfg, args.fresh) for ch in cal_chunks], chunksize=1) for p in ps]
        t4 = time.perf_counter()
    report = summarize_calibration(pairs)

    d = manifest.data
    build_s = t3 - t0
    work_s = stats.play_s + stats.mc_s + stats.annotate_s
    print("\nbuild")
    print(f"  plan {t1 - t0:.1f} s, collect {t2 - t1:.1f} s, write {t3 - t2:.1f} s -> total {build_s:.1f} s")
    by_env = ", ".join(f"{k} {v:.3f}" for k, v in d["success_rate_by_env"].items())
    print(f"  trajectories: {d['trajectories']} ({d['successes']} successes, {d['failures']} failures, "
          f"success rate {d['success_rate']:.3f}; by env {by_env})")
    print(f"  trajectories/s: {d['trajectories'] / (t2 - t1):.1f} (collection wall clock, MC included)")
    print(f"  annotated steps {d['annotated_steps']} of {d['steps']}; rows: wm_amt {d['counts']['wm_amt']}, "
          f"fe_sft {d['counts']['fe_sft']}, rl_tasks {d['counts']['rl_tasks']}")
    ts = d["token_stats"]
    print(f"  {ts['unit']}: wm_amt {ts['wm_amt']['total']}, fe_sft {ts['fe_sft']['total']}; world-model share of "
          f"annotated trajectory tokens {ts['wm_share_of_annotated_tokens']:.3f}")
    print("\nMonte Carlo annotation")
    print(f"  re-rollouts {stats.mc_rollouts} (+{stats.mc_cache_hits} labels reused from the per-batch cache)")
    print(f"  share of collection time: {stats.mc_s / work_s:.1%} (play {stats.play_s:.1f} s, MC {stats.mc_s:.1f} s, "
          f"z_t text {stats.annotate_s:.1f} s, summed over workers)")
    print(f"  re-rollouts/s: {stats.mc_rollouts / stats.mc_s:.0f} per worker, "
          f"{stats.mc_rollouts / (t2 - t1) * stats.mc_s / work_s:.0f} per wall-clock second")
    print(f"  real env steps {stats.env_steps}, memoised steps {stats.memo_hits} "
          f"({stats.memo_hits / max(1, stats.memo_hits + stats.env_steps):.1%} of steps cost nothing)")
    print(f"\ncalibration of q_t ({args.fresh} fresh rollouts per labelled state, {t4 - t3:.1f} s)")
    print(f"  states {report['states']}, pairs {report['pairs']}: ECE {report['ece']:.4f}, Brier {report['brier']:.4f}")
    for env, r in report["by_env"].items():
        print(f"  {env:7s} states {r['states']}, ECE {r['ece']:.4f}, Brier {r['brier']:.4f}")
    print("  reliability bins (q range: count, mean q, success rate of fresh rollouts)")
    for b in report["bins"]:
        if b["count"]:
            print(f"    [{b['lo']:.1f}, {b['hi']:.1f}): {b['count']:5d}  {b['mean_confidence']:.3f}  "
                  f"{b['accuracy']:.3f}")
    print("\ntargets")
    def met(ok: bool) -> str:
        return "MET" if ok else "NOT MET"
    print(f"  corpus build < {TARGET_BUILD_S:.0f} s: {build_s:.1f} s -> {met(build_s < TARGET_BUILD_S)}")
    print(f"  q-label ECE < {TARGET_ECE}: {report['ece']:.4f} -> {met(report['ece'] < TARGET_ECE)}")
    print(f"\noutput: {manifest.uri}")


if __name__ == "__main__":
    main()
