"""SFT throughput on CPU: this project's loop against TRL's SFTTrainer, same model, data, batch, sequence
length and dtype, in one run.

    python benchmarks/sft_throughput.py                 # SmolLM2-135M (GGUF -> bf16 cache), 2 interleaved rounds
    python benchmarks/sft_throughput.py --quick         # tiny random Llama, 3 steps: a smoke test

Data: a small corpus built by the corpus stage (search-world and maths trajectories with hindsight
world-model blocks, ``foresight_core.corpus.build_corpus``), WM-AMT rows: every token but
observations is a target. Each trainer gets the same token ids and the same target mask (ours
through ``foresight_core.sft``; TRL as a pre-tokenised dataset whose ``assistant_masks`` column is our
mask), packs them to ``--seq-len`` (TRL: ``packing_strategy="bfd_split"``, padding-free) and trains
``--steps`` optimiser steps of ``--batch`` rows with AdamW, cosine schedule, clipping, fp32
master weights under bf16 autocast where the CPU has native bf16, plain fp32 elsewhere (both sides).

Variants, each in its own subprocess (a fresh allocator; peak RSS is the child's ``ru_maxrss``):
- ``ours``: ``foresight_core.sft.run_sft`` without Ray or MLflow (the bare stage);
- ``trl``: ``trl.SFTTrainer``; ``gradient_checkpointing`` off to match ours (TRL's default is on:
  ``trl_gc`` and ``ours_ac`` measure that setting on both sides);
- ``ray``: ``tasks.train.run_sft_stage``: the same loop as a 1-worker Ray Train job logging
  to MLflow (sqlite), started from a fresh local Ray;
and, with ``--malloc both`` (default), each with and without ``GLIBC_TUNABLES`` (no mmap, no trim).
Tokens/s counts real (non-pad) tokens over the optimiser steps' wall time (ours: the loop's own
clock; TRL: ``train_runtime`` and its ``num_tokens``). The Ray/MLflow overhead is the ``ray`` stage's
wall time against the bare ``ours`` stage's (both: load model, tokenise, pack, train, checkpoint, save).
Rounds interleave the variants, since the machine's load drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


def pipeline_config(args: argparse.Namespace, work: Path, activation_checkpointing: bool = False, steps: int = 0):
    from foresight_core.config import load_config

    steps = steps or args.steps
    sft = {"seq_len": args.seq_len, "batch_size": args.batch, "grad_accum": 1, "max_steps": steps,
           "lr": 1e-5, "warmup_steps": 1, "eval_share": 0.0, "eval_at_start": False,
           "checkpoint_every": steps, "activation_checkpointing": activation_checkpointing}
    over = [f"work_dir={work}", f"infra.tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"model.source={'tiny' if args.quick else 'smollm2_gguf'}", "infra.ray.num_cpus=2",
            "wm_amt.scaling.cpus_per_worker=2", "wm_amt.scaling.malloc_tuning=" + str(args.malloc_on).lower()]
    over += [f"wm_amt.{k}={v}" for k, v in sft.items()]
    if args.threads:
        over.append(f"num_threads={args.threads}")
    return load_config("tiny" if args.quick else "laptop", overrides=over, env={})


# ---------------------------------------------------------------------------------------------
# Children: one variant each, one JSON line out

def run_ours(args: argparse.Namespace, work: Path, activation_checkpointing: bool, steps: int = 0) -> dict:
    from foresight_core.sft import run_sft

    cfg = pipeline_config(args, work, activation_checkpointing, steps)
    t0 = time.perf_counter()
    result = run_sft(cfg, "wm_amt", args.data, work / "out", verbose=False)
    return {"tokens_per_s": result.tokens_per_s, "tokens_per_cpu_s": result.train_tokens / result.train_cpu_seconds,
            "tokens": result.train_tokens, "train_s": result.train_seconds, "stage_s": time.perf_counter() - t0,
            "final_loss": result.metrics["loss"]}


def run_ray(args: argparse.Namespace, work: Path) -> dict:
    from tasks.train import run_sft_stage

    cfg = pipeline_config(args, work, steps=args.ray_steps)
    t0 = time.perf_counter()
    from tasks.runtime import init_ray, setup_env

    setup_env(cfg)
    init_ray(cfg.infra.ray)
    t_ray = time.perf_counter() - t0
    ref = run_sft_stage("wm_amt", cfg, args.data)
    stage_s = time.perf_counter() - t0 - t_ray
    from mlflow import MlflowClient

    run = MlflowClient(cfg.infra.tracking.tracking_uri).get_run(ref["run_id"])
    return {"tokens_per_s": run.data.metrics["train_tokens_per_s"], "stage_s": stage_s, "ray_init_s": t_ray,
            "final_loss": ref["metrics"]["loss"]}


def run_trl(args: argparse.Namespace, work: Path, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        """Wall and CPU time of each optimiser step (forward, backward, clip, AdamW), as ours counts them."""

        wall = cpu = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.wall += time.perf_counter() - self.t
            self.cpu += time.process_time() - self.c

    from foresight_core.models import bf16_supported, load_model
    from foresight_core.sft import loss_mask, row_sample
    from foresight_core.storage import read_rows

    cfg = pipeline_config(args, work)
    model, tok = load_model(cfg.model, seed=cfg.seed)  # fp32 master weights, as ours
    samples = [row_sample(r, tok) for r in read_rows(args.data)]
    ds = Dataset.from_dict({"input_ids": [s.input_ids for s in samples],
                            "assistant_masks": [loss_mask(s, "all") for s in samples]})
    targs = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch,
                      gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-5,
                      lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, weight_decay=0.0,
                      adam_beta2=0.95, bf16=bf16_supported("cpu"), use_cpu=True, packing=True, packing_strategy="bfd_split",
                      max_length=args.seq_len, gradient_checkpointing=gradient_checkpointing, logging_steps=1,
                      save_strategy="no", report_to=[], dataloader_num_workers=0, seed=cfg.seed,
                      shuffle_dataset=True, disable_tqdm=True)
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[clock])
    out = trainer.train()
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"tokens_per_s": tokens / clock.wall, "tokens_per_cpu_s": tokens / clock.cpu,
            "tokens_per_s_runtime": tokens / out.metrics["train_runtime"], "tokens": tokens, "train_s": clock.wall,
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
            "torch_threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"sftbench-{args.child}-"))
    if args.child == "ours":
        out = run_ours(args, work, activation_checkpointing=False)
    elif args.child == "ours_ac":
        out = run_ours(args, work, activation_checkpointing=True)
    elif args.child == "trl":
        out = run_trl(args, work, gradient_checkpointing=False)
    elif args.child == "trl_gc":
        out = run_trl(args, work, gradient_checkpointing=True)
    elif args.child == "ray":
        out = run_ray(args, work)
    elif args.child == "ray_bare":
        out = run_ours(args, work, activation_checkpointing=False, steps=args.ray_steps)
    else:
        raise SystemExit(f"unknown variant {args.child}")
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: data, then the variants in interleaved rounds

def make_data(args: argparse.Namespace, work: Path) -> str:
    """WM-AMT rows of a small corpus built by the corpus stage (cached under --cache)."""
    from foresight_core.config import load_config
    from foresight_core.corpus import build_corpus

    over = [f"work_dir={work}", "corpus.n_train_tasks=30", "corpus.n_eval_tasks=4", "corpus.rollouts_per_task=1",
            "corpus.mc_rollouts=2", "corpus.general_text_max_rows=20"]
    cfg = load_config("tiny" if args.quick else "laptop", overrides=over, env={})
    return build_corpus(cfg).dataset_uri("wm_amt")


def run_child(args: argparse.Namespace, variant: str, malloc: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OMP_NUM_THREADS")}
    if malloc:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, __file__, "--child", variant, "--data", args.data, "--steps", str(args.steps),
           "--ray-steps", str(args.ray_steps), "--threads", str(args.threads),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--malloc-on", str(int(malloc))]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1][7:]), "process_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ray-steps", type=int, default=20, help="steps of the Ray/MLflow-vs-bare stage pair")
    p.add_argument("--variants", default="ours,trl,ray", help="of ours, trl, ours_ac, trl_gc, ray")
    p.add_argument("--malloc", choices=["both", "on", "off"], default="both")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: torch's default, all cores). 1 makes tokens per CPU-second "
                        "robust to other load on a shared machine (no OpenMP spin-waiting)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "foresight-sftbench"))
    p.add_argument("--data", default=None, help="WM-AMT rows (default: build a small corpus under --cache)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--malloc-on", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.malloc_on = bool(args.malloc_on)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.ray_steps = 3, 2, 256, 3
    if args.child:
        return child(args)

    args.data = args.data or make_data(args, Path(args.cache) / ("quick" if args.quick else "laptop"))
    mallocs = {"both": [True, False], "on": [True], "off": [False]}[args.malloc]
    variants = args.variants.split(",")
    from foresight_core.models import bf16_supported, cpu_type

    # both sides follow the CPU: bf16 autocast where it is native, fp32 where it is emulated (AVX2: ~150x slower)
    dtype = "bf16 autocast" if bf16_supported("cpu") else "fp32 (bf16 is emulated on this CPU)"
    print(f"CPU: {cpu_type()}")
    print(f"SFT throughput: model={'tiny' if args.quick else 'SmolLM2-135M'} threads={args.threads or 'default'} "
          f"batch={args.batch} "
          f"seq_len={args.seq_len} steps={args.steps} dtype={dtype}, fp32 master weights; data={args.data}")
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for malloc in mallocs:
            for v in variants:
                if v == "ray" and not malloc and len(mallocs) > 1:
                    continue  # the adapter sets the tunables itself (scaling.malloc_tuning)
                if v == "ray":  # its pair: the bare stage with the same steps
                    res = run_child(args, "ray_bare", malloc)
                    results.setdefault(("ray_bare", malloc), []).append(res)
                    print(f"  round {r + 1} ray_bare malloc=on  {res['tokens_per_s']:8.1f} tok/s  "
                          f"stage {res['stage_s']:.1f} s", flush=True)
                res = run_child(args, v, malloc)
                results.setdefault((v, malloc), []).append(res)
                print(f"  round {r + 1} {v:8s} malloc={'on ' if malloc else 'off'} "
                      f"{res.get('tokens_per_s') or 0:8.1f} tok/s  {res.get('tokens_per_cpu_s') or 0:7.1f} tok/cpu-s"
                      f"  peak RSS {res['peak_rss_gb']:.2f} GB"
                      + (f"  stage {res['stage_s']:.1f} s" if "stage_s" in res else ""), flush=True)

    def med(v: str, m: bool, key: str) -> float | None:
        vals = [x[key] for x in results.get((v, m), []) if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    print("\nmedian over rounds")
    for (v, m) in results:
        print(f"  {v:8s} malloc={'on ' if m else 'off'} {med(v, m, 'tokens_per_s'):8.1f} tok/s "
              f"{med(v, m, 'tokens_per_cpu_s') or 0:7.1f} tok/cpu-s  peak RSS {med(v, m, 'peak_rss_gb'):.2f} GB")
    for m in mallocs:
        for ours, trl in (("ours", "trl"), ("ours_ac", "trl_gc")):
            a, b = med(ours, m, "tokens_per_s"), med(trl, m, "tokens_per_s")
            if a and b:
                ca, cb = med(ours, m, "tokens_per_cpu_s"), med(trl, m, "tokens_per_cpu_s")
                print(f"ratio {ours}/{trl} (malloc {'on' if m else 'off'}): {a / b:.2f}x tokens/s, "
                      f"{ca / cb:.2f}x tokens/cpu-s; peak RSS {med(ours, m, 'peak_rss_gb'):.2f} vs "
                      f"{med(trl, m, 'peak_rss_gb'):.2f} GB")
    for v in ("ours", "trl"):
        on, off = med(v, True, "tokens_per_s"), med(v, False, "tokens_per_s")
        if on and off:
            print(f"malloc tuning, {v}: {on / off:.2f}x tokens/s")
    if ("ray", True) in results:
        bare, ray = med("ray_bare", True, "stage_s"), med("ray", True, "stage_s")
        print(f"Ray Train + MLflow ({args.ray_steps}-step stage): {ray:.1f} s vs bare {bare:.1f} s = "
              f"{(ray - bare) / ray:.1%} of the stage's wall time; the loop under Ray ran at "
              f"{med('ray', True, 'tokens_per_s'):.1f} tok/s vs {med('ray_bare', True, 'tokens_per_s'):.1f} bare. "
              f"Local Ray start (once per pipeline, not included): {med('ray', True, 'ray_init_s'):.1f} s")


if __name__ == "__main__":
    main()
