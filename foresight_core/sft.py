"""WM-AMT and FE-SFT: one causal-LM training loop, two configs.

- WM-AMT (world-model agentic mid-training, stage 1), ``loss_on: all``: next-token loss on every
  token of whole trajectories -- system prompt, question, plain turns and world-model blocks --
  except observations (``train_on_observations: true`` includes them). General-text rows are
  trained on whole (the guard against forgetting).
- FE-SFT (format-eliciting SFT, stage 2), ``loss_on: assistant``: loss on assistant tokens only
  (their content and end-of-turn token). The paper splits each trajectory into single-turn
  samples; one multi-turn sample with an assistant-only loss trains the same targets on the same
  prefixes in a single pass, so we keep trajectories whole.

Run it alone (no Ray, no MLflow); running the same command again resumes from the latest
checkpoint under ``--out``::

    python -m foresight_core.sft --preset tiny --stage wm_amt --data corpus/wm_amt.jsonl --out runs/wm_amt

With ``<stage>.format_check_tasks`` > 0 and ``--check-tasks`` (a corpus folder, whose eval/* sets are
used, or a task file), the saved final model then plays that many held-out tasks: the format-capability
check of ``foresight_core.capability`` (``check/*`` metrics: format adherence, grounding, ECE, Brier).

Under Ray Train (``tasks.train``) the same ``train`` runs in every worker: it sees the
process group that TorchTrainer set up, wraps the model in DDP (or shards it with FSDP2 when
``scaling.strategy`` is fsdp), shards rows by rank, all-reduces its metrics, and hands each
checkpoint folder to the ``on_checkpoint`` hook (which reports it to Ray). Resuming is one code
path: ``resume_from`` = a checkpoint folder (the latest one under ``--out``, or
``ray.train.get_checkpoint()``); a fresh start is ``resume_from=None``.

Data rows (JSONL or Parquet; ``foresight_core.storage.read_rows``), one of:
- a trajectory: a corpus row ``{"kind": "trajectory", "trajectory": Trajectory.to_dict(), ...}`` or a
  bare ``Trajectory.to_dict()``;
- chat messages: ``{"messages": [{"role": ..., "content": ...}, ...]}``;
- general text: ``{"text": "..."}`` (all tokens are targets under ``loss_on: all``, none under ``assistant``).
Held-out rows: those whose ``split`` is "eval" (or "val", "test"); when no row has one (corpus rows
say which dataset they belong to, "wm_amt" / "fe_sft"), ``eval_share`` of the tasks, chosen by a
hash of the task id (every rollout of a task, plain copies included, lands on the same side).

Sections: data -> loss -> schedule -> checkpoints -> the loop -> entry point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from foresight_core.config.train import SFTConfig
from foresight_core.storage import check_seal, seal
from foresight_core.fsdp import (gather_model, gather_training_state, is_sharded, load_sharded_state, shard_model,
                                 trainable_state)
from foresight_core.losses import CausalLMLoss
from foresight_core.models import save_model, unwrap
from foresight_core.packing import IGNORE, LMSample, Packed, pack
from foresight_core.tracking import NullTracker, Progress, Tracker

EVAL_SPLITS = frozenset({"eval", "val", "valid", "validation", "test"})
CHECKPOINT_FILE = "trainer_state.pt"


# -----------------------------------------------------------------------------
# Data: rows -> tokenised samples -> loss masks -> packed rows

def _trajectory_dict(row: dict[str, Any]) -> dict[str, Any] | None:
    """The trajectory of a row: a corpus row ``{"kind": "trajectory", "trajectory": {...}}`` or a bare one."""
    if isinstance(row.get("trajectory"), dict):
        return row["trajectory"]
    return row if "steps" in row else None


def row_sample(row: dict[str, Any], tokenizer, turn_format: str = "foresight"):
    """One data row as a ``TokenizedSample`` (ids + assistant / observation / wm / policy masks)."""
    from foresight_core.chat import TokenizedSample, tokenize_messages, trajectory_messages
    from foresight_core.types import CorpusRow, Trajectory

    if "kind" in row:  # a corpus row: the corpus's own schema, checked field by field
        corpus_row = CorpusRow.from_dict(row)
        if corpus_row.trajectory is not None:
            return tokenize_messages(tokenizer, trajectory_messages(corpus_row.trajectory, turn_format))
        row = {"text": corpus_row.text}
    elif "steps" in row:  # a bare Trajectory.to_dict()
        return tokenize_messages(tokenizer, trajectory_messages(Trajectory.from_dict(row), turn_format))
    if "messages" in row:
        return tokenize_messages(tokenizer, list(row["messages"]))
    if "text" in row:
        ids = tokenizer(str(row["text"]) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        zeros = [0] * len(ids)
        return TokenizedSample(list(ids), list(zeros), list(zeros), list(zeros), list(zeros))
    raise ValueError(f"a row needs 'trajectory' / 'steps', 'messages' or 'text'; it has {sorted(row)}")


def loss_mask(sample, loss_on: str, train_on_observations: bool = False) -> list[int]:
    """Which tokens are targets: assistant tokens (FE-SFT), observation tokens alone (implicit world
    modelling: predict the next state from the history and the action), or everything but observations
    (WM-AMT)."""
    if loss_on == "assistant":
        return list(sample.assistant_mask)
    if loss_on == "observation":
        return list(sample.observation_mask)
    if train_on_observations:
        return [1] * len(sample.input_ids)
    return [1 - o for o in sample.observation_mask]


def is_eval_row(row: dict[str, Any], index: int, eval_share: float, seed: int, any_split: bool) -> bool:
    """Held out? By the row's ``split`` when some row says "eval", else by a hash of its task id
    (rows without a task, general text, by their index)."""
    if any_split:
        return str(row.get("split", "train")).lower() in EVAL_SPLITS
    traj = _trajectory_dict(row)
    key = str(traj["task"]["id"]) if traj is not None and isinstance(traj.get("task"), dict) else f"row-{index}"
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
    return h < eval_share * 0x1_0000_0000


@dataclass
class SFTData:
    train: Packed
    eval: Packed | None
    info: dict[str, Any] = field(default_factory=dict)


def prepare_data(rows: list[dict[str, Any]], tokenizer, cfg: SFTConfig, seed: int = 0,
                 source: str = "<rows>") -> SFTData:
    """Tokenise, mask and pack ``rows``; a bad row raises ``ValueError`` naming ``source`` and its row number."""
    any_split = any(str(r.get("split", "")).lower() in EVAL_SPLITS for r in rows)
    parts: dict[str, list[LMSample]] = {"train": [], "eval": []}
    for i, row in enumerate(rows):
        try:
            s = row_sample(row, tokenizer, cfg.turn_format)
        except Exception as e:  # FormatError, KeyError, TypeError ...: name the row, keep the cause
            raise ValueError(f"{source}: row {i + 1}: {type(e).__name__}: {e}") from e
        sample = LMSample(s.input_ids, {"loss": loss_mask(s, cfg.loss_on, cfg.train_on_observations),
                                        "wm": list(s.wm_mask)})
        parts["eval" if is_eval_row(row, i, cfg.eval_share, seed, any_split) else "train"].append(sample)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = pack(parts["train"], cfg.seq_len, pad, cfg.long_samples)
    if len(train) == 0:
        raise ValueError(f"{source}: no training row has a target under loss_on={cfg.loss_on!r} "
                         f"({len(rows)} rows, {len(parts['eval'])} held out)")
    held = pack(parts["eval"], cfg.seq_len, pad, cfg.long_samples) if parts["eval"] else None
    info = {"rows": len(rows), "train_samples": len(parts["train"]), "eval_samples": len(parts["eval"]),
            "train_rows_packed": len(train), "train_fill": round(train.stats.fill, 4),
            "train_targets": train.stats.targets["loss"], "train_split": train.stats.split,
            "train_truncated": train.stats.truncated, "train_dropped_empty": train.stats.empty}
    return SFTData(train, held if held is not None and len(held) else None, info)


def micro_batch_rows(k: int, n_rows: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """Rows of this rank's k-th micro-batch.

    Each epoch is a fresh seeded permutation of the rows, cut into global batches of
    ``batch_size * world`` rows; rank r takes the r-th slice of each. So ``world`` workers with
    ``batch_size`` b see together exactly the rows one worker with ``b * world`` sees (DDP is then
    the same optimisation). A few rows (< world) are left out of each epoch so every rank runs the
    same number of micro-batches. k alone is the data position: resuming needs nothing else.

    >>> micro_batch_rows(0, 5, 2, 0, 1, 0) == micro_batch_rows(0, 5, 1, 0, 2, 0) + micro_batch_rows(0, 5, 1, 1, 2, 0)
    True
    """
    usable = n_rows // world * world
    if usable == 0:
        raise ValueError(f"{n_rows} packed rows cannot be shared by {world} workers")
    global_batch = batch_size * world
    per_epoch = math.ceil(usable / global_batch)
    epoch, i = divmod(k, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[:usable]
    chunk = perm[i * global_batch:(i + 1) * global_batch]  # the last one may be short, by a multiple of world
    share = len(chunk) // world
    return chunk[rank * share:(rank + 1) * share].tolist()


# -----------------------------------------------------------------------------
# Schedule: linear warm-up, then cosine to min_lr_ratio

def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    >>> lr_factor(0, 4, 10, 0.1), lr_factor(3, 4, 10, 0.1), lr_factor(10, 4, 10, 0.1)
    (0.25, 1.0, 0.1)
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Checkpoints: trainable weights, optimiser, schedule, data position, every rank's RNG

def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any], *,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``path/trainer_state.pt`` through a temporary folder and a rename (never half a checkpoint).

    ``model_state`` / ``optimizer_state``: already gathered states (FSDP: ``gather_training_state``, which
    every rank calls before rank 0 writes); None: taken from ``model`` and ``optimizer`` (one process, DDP)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": trainable_state(model) if model_state is None else model_state,
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(), **state}, tmp / CHECKPOINT_FILE)
    (tmp / "meta.json").write_text(json.dumps({k: state[k] for k in ("step", "micro_step", "metrics")}, indent=2))
    seal(tmp / CHECKPOINT_FILE)  # its sha256 beside it: a corrupted checkpoint is caught when it is read back
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser and schedule in place; returns the rest (step, micro_step, rng, metrics)."""
    file = Path(path) / CHECKPOINT_FILE
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {CHECKPOINT_FILE})")
    check_seal(file)
    ckpt = torch.load(file, map_location="cpu", weights_only=False)
    expected = set(trainable_state(model))
    if set(ckpt["model"]) != expected:
        missing, extra = sorted(expected - set(ckpt["model"])), sorted(set(ckpt["model"]) - expected)
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    if is_sharded(model):  # FSDP: every rank read the full state; each keeps its own shards of it
        load_sharded_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    else:
        unwrap(model).load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete ``step_*`` checkpoint folder under ``root``, or None."""
    root = Path(root)
    done = [p for p in root.glob("step_*") if (p / CHECKPOINT_FILE).exists() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


# -----------------------------------------------------------------------------
# The loop

@dataclass
class SFTResult:
    step: int
    """Optimiser steps done (max_steps unless stopped)."""
    metrics: dict[str, float]
    """The last value of every metric (loss, eval_loss, eval_wm_loss, ...)."""
    history: list[dict[str, float]]
    """Every logged metrics dict, in order (rank 0)."""
    model_dir: Path | None
    """The final model in Hugging Face format (rank 0; None on other ranks)."""
    train_tokens: int = 0
    """Real (non-pad) tokens trained on in this run, all workers."""
    train_seconds: float = 0.0
    """Wall time of the optimiser steps in this run (evaluation and checkpoints excluded)."""
    train_cpu_seconds: float = 0.0
    """CPU time (all threads of this process) of those steps: robust to other load on the machine."""

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


OnCheckpoint = Callable[[Path | None, dict[str, float]], None]


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(loss_fn: CausalLMLoss, data: Packed, cfg: SFTConfig, rank: int, world: int,
             device, dtype) -> dict[str, float]:
    """Held-out mean NLL per target token: ``eval_loss`` (the stage's targets) and ``eval_wm_loss``
    (world-model-span tokens only: imaginary, keyword, analysis, confidence)."""
    was_training = loss_fn.training
    loss_fn.eval()
    n = len(data) if cfg.max_eval_rows is None else min(len(data), cfg.max_eval_rows)
    mine = list(range(rank, n, world))
    sharded = is_sharded(loss_fn)  # FSDP: loss_fn is the root
    # FSDP gathers parameters in every forward, a collective: all ranks run as many batches as rank 0
    # (which has the most rows); a rank out of rows runs its first row again and drops the result
    n_batches = math.ceil(math.ceil(n / world) / cfg.batch_size) if sharded else math.ceil(len(mine) / cfg.batch_size)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, loss count, wm sum, wm count
    for i in range(0, n_batches * cfg.batch_size, cfg.batch_size):
        rows = mine[i:i + cfg.batch_size]
        b = {k: v.to(device) for k, v in data.batch(rows or [0]).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = loss_fn(b["input_ids"], b["position_ids"], {"loss": b["labels"], "wm": b["labels_wm"]})
        if not rows:
            continue
        sums[0] += out["loss"].item()
        sums[1] += (b["labels"] != IGNORE).sum().item()
        sums[2] += out["wm"].item()
        sums[3] += (b["labels_wm"] != IGNORE).sum().item()
    if sharded:
        loss_fn.reshard()  # the root keeps its gathered parameters after a forward; shard them again
    ls, lc, ws, wc = _all_reduce(sums, device)
    loss_fn.train(was_training)
    metrics = {"eval_loss": ls / lc} if lc else {}
    if wc:
        metrics["eval_wm_loss"] = ws / wc
    return metrics


def train(model: nn.Module, tokenizer, data: SFTData, cfg: SFTConfig, out_dir: str | os.PathLike, *,
          seed: int = 0, dtype: torch.dtype = torch.bfloat16, tracker: Tracker | None = None,
          on_checkpoint: OnCheckpoint | None = None, resume_from: str | os.PathLike | None = None,
          verbose: bool = True) -> SFTResult:
    """Train ``model`` on ``data.train`` for ``cfg.max_steps`` optimiser steps; see the module docstring.

    ``out_dir`` gets ``checkpoints/step_N`` (rank 0) and the final HF model in ``model/``.
    ``on_checkpoint(path or None, metrics)`` is called on every rank after each checkpoint
    (the path on rank 0). ``resume_from``: a checkpoint folder to continue from.
    With a process group, ``cfg.scaling.strategy`` picks DDP or FSDP (``model`` is then sharded in
    place: its parameters become DTensors); one process ignores it.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)

    # ---- distributed: a process group exists under Ray Train / torchrun; else one process
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    fsdp = distributed and cfg.scaling.strategy == "fsdp"
    device = next(model.parameters()).device
    master = rank == 0
    say = print if (verbose and master) else (lambda *a, **k: None)
    progress = Progress.of(tracker if master else None)  # what the driver's progress bar shows

    # ---- model, optimiser, schedule
    if cfg.activation_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 name
            base.activation_checkpointing_enable()
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_fn = CausalLMLoss(model, cfg.loss_chunk, dtype)
    if fsdp:
        shard_model(loss_fn, device)  # in place: loss_fn is the FSDP root
        ddp = loss_fn
    elif distributed:
        ddp = nn.parallel.DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))

    # ---- resume: the same objects, filled from the checkpoint
    step, micro_step = 0, 0
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}  # the latest value of every metric
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model, optimizer, scheduler)
        step, micro_step, last = ckpt["step"], ckpt["micro_step"], dict(ckpt["metrics"])
        if ckpt.get("world_size", world) != world:
            say(f"resuming a {ckpt['world_size']}-worker run on {world}: the data order changes from here")
        _set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0])
        say(f"resumed from {resume_from} at step {step}")
    else:
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)

    def log(metrics: dict[str, float], at: int) -> None:
        if master:
            tracker.log_metrics(metrics, step=at)
            history.append({"step": at, **metrics})

    def checkpoint(metrics: dict[str, float]) -> None:
        rng = [None] * world
        if distributed:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        path = None
        model_state, optimizer_state = gather_training_state(model, optimizer) if fsdp else (None, None)
        if master:
            path = save_checkpoint(out_dir / "checkpoints" / f"step_{step:06d}", model, optimizer, scheduler,
                                   {"step": step, "micro_step": micro_step, "rng": rng, "world_size": world,
                                    "seed": seed, "metrics": metrics, "config": cfg.model_dump(mode="json")},
                                   model_state=model_state, optimizer_state=optimizer_state)
        if on_checkpoint is not None:
            on_checkpoint(path, {"step": step, **metrics})
        if master:  # keep the newest few locally
            old = sorted((out_dir / "checkpoints").glob("step_*"), key=lambda p: p.name)[:-cfg.keep_checkpoints]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)

    n_rows = len(data.train)
    say(f"sft: {n_rows} packed rows of {cfg.seq_len} tokens ({data.train.stats.fill:.0%} full), "
        f"{world} worker(s) x {cfg.batch_size} rows x {cfg.grad_accum} accum, {cfg.max_steps} steps")

    # ---- evaluation before training: the baseline the stage must beat
    if data.eval is not None and cfg.eval_at_start and resume_from is None:
        progress.phase("held-out loss before training")
        last.update(evaluate(loss_fn, data.eval, cfg, rank, world, device, dtype))
        log({k: v for k, v in last.items() if k.startswith("eval")}, 0)
        say("step 0 | " + " | ".join(f"{k} {v:.4f}" for k, v in last.items()))

    # ---- training
    train_tokens, train_seconds, train_cpu_seconds = 0, 0.0, 0.0
    progress.phase("train", total=cfg.max_steps, unit="steps", done=step)
    while step < cfg.max_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        batches = [data.train.batch(micro_batch_rows(micro_step + a, n_rows, cfg.batch_size, rank, world, seed))
                   for a in range(cfg.grad_accum)]
        # normalise by the step's target count over all micro-batches and ranks: every target weighs the same
        local_targets = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        tokens = sum(int(b["n_real"].sum()) for b in batches)
        n_targets, tokens_total = _all_reduce([float(local_targets), float(tokens)], device)
        loss_sum = 0.0
        for a, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            sync = a == cfg.grad_accum - 1
            # DDP: all-reduce once, on the last micro-batch. FSDP: reduce-scatter every micro-batch
            with ddp.no_sync() if (distributed and not fsdp and not sync) else nullcontext():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    nll = ddp(b["input_ids"], b["position_ids"], {"loss": b["labels"]})["loss"]  # scalar sum
                # DDP and FSDP average gradients over ranks, so scale by world to get sum / n_targets overall
                (nll * (world / max(n_targets, 1.0))).backward()
            loss_sum += nll.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # FSDP: the norm of the whole model
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        lr = scheduler.get_last_lr()[0]  # the lr of this step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        micro_step += cfg.grad_accum
        step += 1
        dt = time.perf_counter() - t0
        train_cpu_seconds += time.process_time() - c0
        (loss_total,) = _all_reduce([loss_sum], device)
        train_tokens += int(tokens_total)
        train_seconds += dt
        metrics = {"loss": loss_total / max(n_targets, 1.0), "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tokens_total / dt,
                   "epoch": micro_step / math.ceil(n_rows // world * world / (cfg.batch_size * world))}
        if data.eval is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            progress.update(step - 1, detail="held-out loss", force=True)
            metrics.update(evaluate(loss_fn, data.eval, cfg, rank, world, device, dtype))
        log(metrics, step)
        progress.update(step, detail="")
        last.update(metrics)
        say(f"step {step}/{cfg.max_steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint(dict(last))

    # ---- the final model, in Hugging Face format
    progress.phase("saving the model")
    model_dir = None
    whole = gather_model(model) if fsdp else model
    if master:
        model_dir = save_model(whole, tokenizer, out_dir / "model")
    if distributed:
        dist.barrier()
    return SFTResult(step=step, metrics=last, history=history, model_dir=model_dir,
                     train_tokens=train_tokens, train_seconds=train_seconds, train_cpu_seconds=train_cpu_seconds)


# -----------------------------------------------------------------------------
# Entry point: rows + model from config, then train (the CLI, the Ray worker, the benchmark)

def stage_device(stage_cfg: SFTConfig) -> torch.device:
    """This rank's device: its local GPU when the stage asks for GPUs and has them, else the CPU."""
    use_cuda = stage_cfg.scaling.use_gpu and torch.cuda.is_available()
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")


def run_sft(cfg, stage: str, data_uri: str, out_dir: str | os.PathLike, *, init_model: str | None = None,
            tracker: Tracker | None = None, on_checkpoint: OnCheckpoint | None = None,
            resume_from: str | os.PathLike | None = None, verbose: bool = True,
            check_task_uris: Sequence[str] = ()) -> SFTResult:
    """Stage ``stage`` ("wm_amt" | "fe_sft") of the ``PipelineConfig`` ``cfg`` on the rows at ``data_uri``.

    ``init_model``: an HF folder to start from (the previous stage's output); None: ``cfg.model``.
    ``check_task_uris``: held-out task files for the format-capability check (``check_final_model``), run on
    rank 0 from the saved final model when ``<stage>.format_check_tasks`` > 0.
    """
    from foresight_core.models import compute_dtype, load_model
    from foresight_core.storage import read_rows

    stage_cfg: SFTConfig = getattr(cfg, stage)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = stage_device(stage_cfg)
    model_cfg = cfg.model if init_model is None else cfg.model.saved(str(init_model), train=True)
    progress = Progress.of(tracker if not dist.is_initialized() or dist.get_rank() == 0 else None)
    progress.phase("loading the model")
    model, tokenizer = load_model(model_cfg, str(device), seed=cfg.seed)
    progress.phase("tokenising and packing the data")
    data = prepare_data(read_rows(data_uri, storage=cfg.infra.storage), tokenizer, stage_cfg,
                        seed=cfg.seed, source=data_uri)
    if tracker is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        tracker.log_params({f"data.{k}": v for k, v in data.info.items()})
    result = train(model, tokenizer, data, stage_cfg, out_dir, seed=cfg.seed,
                   dtype=compute_dtype(model_cfg, str(device)), tracker=tracker, on_checkpoint=on_checkpoint,
                   resume_from=resume_from, verbose=verbose)
    if stage_cfg.format_check_tasks and check_task_uris and result.model_dir is not None:
        del model, data  # the check loads the saved model: free the training copy first
        check_final_model(cfg, stage, result, check_task_uris, device, tracker, verbose)
    return result


def check_final_model(cfg, stage: str, result: SFTResult, task_uris: Sequence[str],
                      device: torch.device | str = "cpu", tracker: Tracker | None = None,
                      verbose: bool = True) -> dict[str, float]:
    """The stage's format-capability check (``foresight_core.capability``) on ``result.model_dir``: its
    metrics, as ``check/<name>``, logged at the final step and added to ``result.metrics``. A check that
    fails (bad task rows, an environment error) is reported and tagged, never fails the stage."""
    from foresight_core.capability import run_format_check, summary_line

    progress = Progress.of(tracker)
    progress.phase("format check", total=getattr(cfg, stage).format_check_tasks, unit="episodes")
    try:
        raw = run_format_check(cfg, stage, result.model_dir, task_uris, str(device),
                               on_progress=progress.episodes())
    except Exception as e:  # bad task rows, a broken environment: the trained model is kept either way
        message = f"{stage} format check failed, the trained model is kept: {e!r}"
        print(message)
        (tracker or NullTracker()).set_tags({"foresight.check.error": message[:5000]})
        return {}
    check = {f"check/{k}": v for k, v in raw.items()}
    (tracker or NullTracker()).log_metrics(check, step=result.step)
    result.metrics.update(check)
    result.history.append({"step": result.step, **check})
    if verbose:
        print(f"{stage} format check: {summary_line(raw)}")
    return check


def main(argv: list[str] | None = None) -> int:
    from foresight_core.config.load import load_config

    p = argparse.ArgumentParser(description="WM-AMT / FE-SFT without Ray or MLflow (resumes from --out)")
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--stage", choices=["wm_amt", "fe_sft"], required=True)
    p.add_argument("--data", required=True, help="JSONL / Parquet rows (local path or s3://)")
    p.add_argument("--out", required=True, help="output folder: checkpoints/ and model/")
    p.add_argument("--init-model", default=None, help="HF folder to start from (default: the config's model)")
    p.add_argument("--check-tasks", default=None,
                   help="held-out tasks for the format check (<stage>.format_check_tasks > 0): a corpus folder "
                        "(its eval/* sets) or a JSONL / Parquet task file")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    check_uris: list[str] = []
    if args.check_tasks:
        from foresight_core.capability import held_out_task_uris

        check_uris = held_out_task_uris(args.check_tasks, cfg.infra.storage)
        if not check_uris:
            p.error(f"--check-tasks {args.check_tasks}: neither a task file nor a corpus folder with eval/* sets")
    result = run_sft(cfg, args.stage, args.data, args.out, init_model=args.init_model,
                     resume_from=latest_checkpoint(Path(args.out) / "checkpoints"), check_task_uris=check_uris)
    print(json.dumps({"model_dir": str(result.model_dir), "step": result.step,
                      "tokens_per_s": round(result.tokens_per_s, 1), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
