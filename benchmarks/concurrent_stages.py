"""Two stages side by side on one thread each, against one stage at a time on every thread.

    python benchmarks/concurrent_stages.py             # SmolLM2-135M: decoding and training, 2 cores
    python benchmarks/concurrent_stages.py --quick     # the tiny random model (a smoke run, no figures)

One stage at a time on all cores is wasteful on a small CPU where a stage decodes: a decoding step of a
135M model moves every weight through memory for a handful of tokens, so a second thread adds little. This
measures what running two stages at once, one thread each, buys: what ``foresight ablate`` does with
``lanes: 2`` (two rows at once, each stage on its share of the CPUs). Each side does the same work twice: a 600-token prompt for 4 sequences, then
``--decode-tokens`` greedy tokens after it (FC-RL's group, an eval batch; a rollout's later turns reuse
the prompt's keys and values, so its time is mostly decoding) and ``--train-steps`` training steps on one
1024-token row (WM-AMT / FE-SFT). The baseline does the two units one after the other in one
process on all threads; ours runs the two units at once in two processes on one thread each. Model
loading is outside the timing. It prints the wall time of each side, per kind of work, and the ratio
(above 1: the concurrent side finished the same work sooner), with the CPU type and the dtype: compare
them only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def work(threads: int, quick: bool, decode_tokens: int, train_steps: int, units: int) -> dict[str, float]:
    """``units`` units of decoding and of training in this process on ``threads`` threads; seconds of each."""
    import torch

    from foresight_core.config import ModelConfig
    from foresight_core.models import compute_dtype, load_model
    from foresight_core.rollout import HFEngine, SamplingParams

    torch.set_num_threads(threads)
    mcfg = ModelConfig(source="tiny" if quick else "smollm2_gguf")
    dtype = compute_dtype(mcfg, "cpu")
    model, tok = load_model(mcfg, "cpu", train=False, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (600,), generator=g).tolist() for _ in range(4)]
    engine = HFEngine(model, tok, autocast_dtype=None, reuse_kv=False)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2))  # warm-up
    prefill_s = decode_s = 0.0
    for _ in range(units):  # the decoding steps alone: a call of 1 new token (the prompt) subtracted
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=1))
        t1 = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=decode_tokens + 1))
        prefill_s += t1 - t0
        decode_s += time.perf_counter() - t1 - (t1 - t0)

    learner, _ = load_model(mcfg, "cpu", train=True, seed=0)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-5)
    row = torch.randint(100, 5000, (1, 1024), generator=g)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = learner(input_ids=row, labels=row).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(units * train_steps):
        step()
    return {"prefill_s": prefill_s, "decode_s": decode_s, "train_s": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # threads of a worker process
    p.add_argument("--units", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(work(a.worker, a.quick, a.decode_tokens, a.train_steps, a.units)), flush=True)
        return

    import torch

    from foresight_core.config import ModelConfig
    from foresight_core.models import compute_dtype, cpu_type

    cores = os.cpu_count() or 1
    dtype = compute_dtype(ModelConfig(source="tiny" if a.quick else "smollm2_gguf"), "cpu")
    print(f"CPU: {cpu_type()}; {'bf16' if dtype == torch.bfloat16 else 'fp32'} on both sides", flush=True)
    base_cmd = [sys.executable, __file__, "--decode-tokens", str(a.decode_tokens), "--train-steps", str(a.train_steps)]
    base_cmd += ["--quick"] if a.quick else []

    def run(procs: list[list[str]]) -> list[dict[str, float]]:
        running = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in procs]
        outs = [r.communicate()[0] for r in running]
        if any(r.returncode for r in running):
            sys.exit("a worker failed; see its output above")
        return [json.loads(o.strip().splitlines()[-1]) for o in outs]

    (seq,) = run([base_cmd + ["--worker", str(cores), "--units", "2"]])
    par = run([base_cmd + ["--worker", "1", "--units", "1"] for _ in range(2)])
    for kind, what in (("prefill_s", "a 600-token prompt x 4 sequences"),
                       ("decode_s", f"decoding ({a.decode_tokens} tokens x 4 sequences, the prompt's time subtracted)"),
                       ("train_s", f"training ({a.train_steps} steps of 1024 tokens)")):
        base, ours = seq[kind], max(r[kind] for r in par)
        print(f"{what}, twice: baseline one at a time on {cores} threads {base:.1f} s | "
              f"ours two at once on 1 thread each {ours:.1f} s | ratio {base / ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
