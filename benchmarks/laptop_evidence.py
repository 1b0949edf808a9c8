"""Evidence that the stages learn, at a preset's scale: the figures issues #3 and #4 ask for.

    python benchmarks/laptop_evidence.py                       # laptop preset, into ./foresight-work/evidence
    python benchmarks/laptop_evidence.py --preset tiny --out /tmp/ev --set fc_rl.max_steps=2
    python benchmarks/laptop_evidence.py --skip fe_only        # without the FE-SFT-only comparison

It runs the same ``foresight_core`` functions the Ray workers run, in this one process (no Ray, no
MLflow, no Prefect: only the science is measured), and prints:

1. WM-AMT: held-out loss and world-model-span loss, before and after (``wm_amt``);
2. FE-SFT from the WM-AMT model (``wm_fe``): held-out losses, then the stage's format-capability
   check (``foresight_core.capability``: free generation on ``fe_sft.format_check_tasks`` held-out
   tasks; format adherence, success, keyword grounding, ECE and Brier of the stated confidence);
3. the same FE-SFT from the base model (``fe_only``) and its check: the format-capability gap;
4. FC-RL from ``wm_fe``: held-out success, format, grounding, ECE and Brier before and after
   (``fc_rl.n_eval_tasks`` tasks at the sampling temperature, same tasks and seed before and after), and
   the training wall time.

Every stage's model is saved under ``--out/<name>/model``; a stage whose model is there is not
trained again (delete the folder to redo it). Results are also written to ``--out/evidence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GLIBC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
CHECK_KEYS = ("n_tasks", "format_rate", "valid_turn_rate", "success_rate", "grounding_rate", "ece", "brier",
              "mean_confidence")
RL_KEYS = ("success_rate", "format_rate", "grounding_rate", "calib/ece", "calib/brier", "confidence_rate")


class PrintTracker:
    """Per-step RL metrics to stdout (the stage logs the same names to MLflow)."""

    keys = ("reward/episode_mean", "success_rate", "format_rate", "calib/ece", "grounding_rate", "perf/step_s")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shown = {k: round(v, 3) for k, v in metrics.items() if k in self.keys}
        if shown:
            print(f"  fc_rl step {step}: {shown}", flush=True)

    def log_table(self, *a: Any, **k: Any) -> None: ...

    def log_params(self, *a: Any, **k: Any) -> None: ...

    def set_tags(self, *a: Any, **k: Any) -> None: ...


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--out", default="./foresight-work/evidence")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--skip", action="append", default=[], choices=["fe_only", "fc_rl"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    if os.environ.get("GLIBC_TUNABLES") != GLIBC:  # glibc reads it at start: run again with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, GLIBC_TUNABLES=GLIBC))

    import torch

    from foresight_core.capability import held_out_task_uris, read_tasks, run_format_check, summary_line
    from foresight_core.config import load_config
    from foresight_core.corpus import build_corpus
    from foresight_core.fc_rl import eval_subset, run_fc_rl
    from foresight_core.sft import run_sft

    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.preset, overrides=[f"work_dir={out}", *a.overrides])
    results: dict[str, Any] = {"preset": a.preset, "overrides": a.overrides}

    t = time.perf_counter()
    corpus = str(out / "corpus")
    build_corpus(cfg, corpus, progress=False)
    print(f"corpus: {corpus} ({time.perf_counter() - t:.0f} s)", flush=True)
    check_uris = held_out_task_uris(corpus, cfg.infra.storage)

    def sft(name: str, stage: str, init: str | None) -> None:
        if (out / name / "model" / "config.json").exists():
            print(f"{name}: reusing {out / name / 'model'}", flush=True)
            return
        t0 = time.perf_counter()
        r = run_sft(cfg, stage, f"{corpus}/{stage}.jsonl", out / name,
                    init_model=str(out / init / "model") if init else None, verbose=False)
        evals = [h for h in r.history if "eval_loss" in h]
        results[name] = {"eval_first": evals[0] if evals else {}, "eval_last": evals[-1] if evals else {},
                         "train_tokens_per_s": r.tokens_per_s, "minutes": (time.perf_counter() - t0) / 60}
        first, last = results[name]["eval_first"], results[name]["eval_last"]
        print(f"{name}: held-out loss {first.get('eval_loss', float('nan')):.3f} -> {last.get('eval_loss', float('nan')):.3f}, "
              f"world-model spans {first.get('eval_wm_loss', float('nan')):.3f} -> "
              f"{last.get('eval_wm_loss', float('nan')):.3f} ({results[name]['minutes']:.1f} min)", flush=True)

    def check(name: str) -> None:
        if not cfg.fe_sft.format_check_tasks or not check_uris:
            return
        m = run_format_check(cfg, "fe_sft", out / name / "model", check_uris)
        results[f"check_{name}"] = {k: m.get(k) for k in CHECK_KEYS}
        print(f"{name} format check (T={cfg.fe_sft.format_check_temperature}): {summary_line(m)}", flush=True)

    sft("wm_amt", "wm_amt", None)
    sft("wm_fe", "fe_sft", "wm_amt")
    check("wm_fe")
    if "fe_only" not in a.skip:
        sft("fe_only", "fe_sft", None)
        check("fe_only")

    if "fc_rl" not in a.skip:
        rl = cfg.fc_rl
        train = read_tasks(f"{corpus}/rl_tasks.jsonl")
        held = eval_subset([t for u in check_uris for t in read_tasks(u)], rl.n_eval_tasks)  # as the stage does
        t0 = time.perf_counter()
        res = run_fc_rl(cfg, train, out / "fc_rl", eval_tasks=held, init_model=str(out / "wm_fe" / "model"),
                        tracker=PrintTracker()).result
        train_min = sum(h["perf/step_s"] for h in res.history) / 60
        results["fc_rl"] = {"before": {k: res.eval_before.get(k) for k in RL_KEYS},
                            "after": {k: res.eval_after.get(k) for k in RL_KEYS}, "n_eval_tasks": len(held),
                            "train_minutes": train_min, "minutes": (time.perf_counter() - t0) / 60}
        print(f"fc_rl ({rl.max_steps} steps, {train_min:.1f} min of training; {len(held)} held-out tasks at "
              f"T={rl.temperature}):", flush=True)
        for k in RL_KEYS:
            b, f = results["fc_rl"]["before"][k], results["fc_rl"]["after"][k]
            if b is not None and f is not None:
                print(f"  {k:16s} {b:.3f} -> {f:.3f}", flush=True)

    (out / "evidence.json").write_text(json.dumps(results, indent=1))
    print(f"written: {out / 'evidence.json'}")


if __name__ == "__main__":
    main()
