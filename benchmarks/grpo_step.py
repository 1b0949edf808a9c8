"""One GRPO step, single-turn, on GSM-symbolic: Foresight's loop against TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                      # SmolLM2-135M, 4 prompts x G=4, 128 new tokens, 3 steps
    python benchmarks/grpo_step.py --steps 4 --max-new-tokens 64

Both sides get the same model (SmolLM2-135M-Instruct via ``load_model``: fp32 master weights, bf16
autocast where the CPU supports it), the same problems and chat template, group size, batch,
generation length, sampling (temperature 1, no top-k/top-p), loss (token-mean clipped surrogate,
no KL, one optimiser step per batch, as TRL's defaults) and the same reward function (math-verify
of the completion against the gold answer). TRL runs without vLLM. Each side runs in its own
subprocess under the same environment (threads, GLIBC malloc tunables), and reports the wall time
and the CPU time (``time.process_time``, all threads) of every step: on a machine shared with other
work, CPU time is the steadier measure. The first step of each process is warm-up and left out of the
mean. With ``--repeats`` the sides take turns (TRL, ours, TRL, ours, ...) so that a busy machine
slows both alike.

Ours is timed twice: as configured by default, and with ``skip_zero_advantage`` off so that every
rollout goes through the learner as in TRL (the fair like-for-like number; the default skips
groups whose rollouts all score the same, which carry no gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GLIBC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


def gsm_problems(n: int, seed: int) -> list[dict]:
    import reasoning_gym
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [{"question": x["question"] + "\nGive the final number at the end.", "answer": str(x["answer"])}
            for x in ds]


def gsm_reward(completion: str, answer: str) -> float:
    """1.0 when math-verify finds the gold answer in the completion (its last number), else 0.0."""
    from math_verify import parse, verify
    try:
        return float(verify(parse(answer), parse(completion)))
    except Exception:  # math-verify on junk text
        return 0.0


def run_ours(a: argparse.Namespace) -> dict:
    from foresight_core.config import FCRLConfig, ModelConfig
    from foresight_core.fc_rl import train_fc_rl
    from foresight_core.models import compute_dtype, load_model
    from foresight_core.tracking import NullTracker
    from foresight_core.types import StepResult, Task

    class GSMAnswer:
        """Single-turn GSM: the completion is the answer, scored by ``gsm_reward``."""
        name, max_turns = "math", 1

        def reset(self, task: Task) -> str:
            self.task = task
            return task.question

        def step(self, action):  # noqa: ANN001
            s = self.reward(action.content, self.task)
            return StepResult(observation=None, done=True, success=s == 1.0, score=s)

        def reward(self, prediction: str, task: Task) -> float:
            return gsm_reward(prediction, task.answers[0])

    mcfg = ModelConfig(source="smollm2_gguf")
    model, tok = load_model(mcfg, "cpu")
    probs = gsm_problems(a.batch * a.steps, a.seed)
    tasks = [Task(id=str(i), env="math", question=p["question"], answers=[p["answer"]]) for i, p in enumerate(probs)]
    cfg = FCRLConfig(turn_format="raw", group_size=a.group, tasks_per_step=a.batch, max_steps=a.steps, lr=1e-6,
                     max_new_tokens=a.max_new_tokens, n_eval_tasks=0, format_weight=0.0, use_calibration=False,
                     use_grounding=False, omega_math=0.0, skip_zero_advantage=a.skip_zero,
                     micro_batch_tokens=a.micro_batch_tokens, checkpoint_every=10_000)
    class CPUClock(NullTracker):  # process CPU time at the end of every step (metrics are logged once a step)
        marks: list[float] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.marks.append(time.process_time())

    clock = CPUClock()
    t0 = time.process_time()
    res = train_fc_rl(cfg, model, tok, tasks, lambda t: GSMAnswer(), seed=a.seed, tracker=clock,
                      autocast_dtype=compute_dtype(mcfg, "cpu"))
    h = res.history
    marks = [t0] + clock.marks
    return {"step_s": [m["perf/step_s"] for m in h], "cpu_s": [b - a for a, b in zip(marks, marks[1:])],
            "rollout_s": [m["perf/rollout_s"] for m in h],
            "rollout_tokens_per_s": [m["perf/rollout_tokens_per_s"] for m in h],
            "update_s": [m["perf/update_s"] for m in h], "reward": [m["reward/episode_mean"] for m in h],
            "completion_tokens": [m["len/response_tokens_mean"] for m in h],
            "skipped": [m["skipped_rollouts"] for m in h]}


def run_trl(a: argparse.Namespace) -> dict:
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from foresight_core.config import ModelConfig
    from foresight_core.models import bf16_supported, load_model

    model, tok = load_model(ModelConfig(source="smollm2_gguf"), "cpu")
    probs = gsm_problems(a.batch * a.steps, a.seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]}
                              for p in probs])

    def reward(completions, answer, **_):  # noqa: ANN001
        return [gsm_reward(c[0]["content"], g) for c, g in zip(completions, answer)]

    times: list[float] = []
    cpu: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=a.batch * a.group, num_generations=a.group,
                          gradient_accumulation_steps=1, max_completion_length=a.max_new_tokens, max_steps=a.steps,
                          learning_rate=1e-6, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
                          num_iterations=1, use_vllm=False, use_cpu=True, bf16=bf16_supported("cpu"),
                          logging_steps=1, report_to=[], save_strategy="no", shuffle_dataset=False, seed=a.seed,
                          dataloader_num_workers=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                              callbacks=[StepTimer()])
        trainer.train()
    return {"step_s": times, "cpu_s": cpu, "completion_tokens": lengths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per side (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-zero", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:  # a child: run one side, print its JSON on the last line
        import torch
        torch.set_num_threads(a.threads)
        print(json.dumps(run_ours(a) if a.side == "ours" else run_trl(a)))
        return

    env = dict(os.environ, GLIBC_TUNABLES=GLIBC, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    base = [sys.executable, __file__, "--batch", str(a.batch), "--group", str(a.group), "--max-new-tokens",
            str(a.max_new_tokens), "--steps", str(a.steps), "--threads", str(a.threads),
            "--micro-batch-tokens", str(a.micro_batch_tokens)]
    sides = {"trl": ["--side", "trl"], "ours": ["--side", "ours", "--skip-zero", "0"],
             "ours_default": ["--side", "ours", "--skip-zero", "1"]}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    from foresight_core.models import bf16_supported, cpu_type

    print(f"CPU: {cpu_type()}; dtype {'bf16 autocast' if bf16_supported('cpu') else 'fp32'} on both sides", flush=True)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for rep in range(a.repeats):  # interleaved, so that a busy machine slows both sides alike
        for name, extra in sides.items():
            t0 = time.perf_counter()
            p = subprocess.run(base + extra + ["--seed", str(a.seed + rep)], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{name} failed:\n{p.stderr[-4000:]}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"{name:13s} step wall {[round(x, 1) for x in runs[name][-1]['step_s']]} s, "
                  f"cpu {[round(x, 1) for x in runs[name][-1]['cpu_s']]} s "
                  f"(process {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)

    def mean(name: str, key: str) -> float:  # over every run of a side, each run's warm-up step left out
        xs = [x for r in runs[name] for x in (r[key][1:] if len(r[key]) > 1 else r[key])]
        return sum(xs) / len(xs)

    trl, ours, dflt = mean("trl", "step_s"), mean("ours", "step_s"), mean("ours_default", "step_s")
    trl_cpu, ours_cpu, dflt_cpu = mean("trl", "cpu_s"), mean("ours", "cpu_s"), mean("ours_default", "cpu_s")
    print(f"\nSmolLM2-135M, GSM-symbolic single-turn, {a.batch} prompts x G={a.group}, "
          f"{a.max_new_tokens} new tokens, {a.threads} threads, {a.repeats} x {a.steps} steps per side")
    print(f"TRL GRPOTrainer step     {trl:7.1f} s wall, {trl_cpu:7.1f} s CPU   "
          f"(mean completion {mean('trl', 'completion_tokens'):.0f} tokens)")
    print(f"Foresight step           {ours:7.1f} s wall, {ours_cpu:7.1f} s CPU   "
          f"(mean completion {mean('ours', 'completion_tokens'):.0f} "
          f"tokens; rollout {mean('ours', 'rollout_s'):.1f} s, update {mean('ours', 'update_s'):.1f} s)")
    print(f"ratio Foresight / TRL    {ours / trl:7.2f} wall, {ours_cpu / trl_cpu:5.2f} CPU   (target <= 0.7)")
    skipped = [x for r in runs["ours_default"] for x in r["skipped"]]
    print(f"Foresight, default skip  {dflt:7.1f} s wall: ratio {dflt / trl:.2f} wall, {dflt_cpu / trl_cpu:.2f} CPU "
          f"(rollouts skipped per step: {skipped})")
    print(f"rollout tokens/s (ours)  {mean('ours', 'rollout_tokens_per_s'):7.1f}")


if __name__ == "__main__":
    main()
