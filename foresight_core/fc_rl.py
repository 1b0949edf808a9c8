"""Stage 3, FC-RL: foresight-conditioned GRPO with multi-turn tool rollouts.

    run = run_fc_rl(cfg, train_tasks, "work/fc_rl", eval_tasks=held_out, init_model="work/fe_sft/model")
    run.model_dir, run.result.history                      # as sft.run_sft: config and references in
    result = train_fc_rl(cfg.fc_rl, model, tokenizer, train_tasks, make_env, seed=cfg.seed,
                         eval_tasks=held_out, checkpoint_dir="work/fc_rl/ckpt", tracker=tracker)
    python -m foresight_core.fc_rl --preset tiny --tasks CORPUS --out DIR --init-model FE_SFT_MODEL

One GRPO step, top to bottom (``train_fc_rl``):

    sample tasks -> play_group (G rollouts each, all episodes batched turn by turn)
      -> rewards: R_E per rollout; R_calib, R_ground -> R_WM per step; A_S per step
      -> advantages: A_E (group-normalised R_E), A_WM (group-normalised R_WM)
      -> per-token advantages: A_WM on world-model tokens, A_E + omega * A_S on policy tokens,
         A_E on the rest of the generated text, nothing on observation tokens
      -> old log-probs (only when the step makes more than one optimiser step)
      -> clipped-surrogate update (ppo epochs x mini-batches, length-sorted micro-batches, grad accumulation)
      -> weights to the engine -> metrics -> sample table -> checkpoint

Simplifications, said out loud:
- On CPU the HF engine samples from the learner's own module: no weight copy at all.
- With one epoch and one mini-batch the update is on-policy, so pi_old = pi (detached) and the extra
  forward pass that would compute it is skipped (TRL does the same).
- Rollouts whose trained tokens all have advantage 0 carry no gradient when there is no KL term
  (d(-ratio * 0)/d theta = 0); they are counted in the token mean but not run through the model
  (``skip_zero_advantage``; with task reward only, every group whose G rollouts score alike).
- Learner log-probabilities use logits / temperature, the distribution the engine sampled from
  (top_p < 1 makes the engine's differ; the ratio uses the learner's on both sides).

DDP-aware: when ``torch.distributed`` is initialised each rank plays its share of the step's tasks,
the model is wrapped in DistributedDataParallel, and the loss is normalised by the global token count.
Nothing here imports Ray, Prefect, MLflow or vLLM; ``tasks.rl`` wraps this in Ray Train.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from foresight_core import grpo, scoring
from foresight_core.chat import ChatBridge
from foresight_core.config.rl import FCRLConfig
from foresight_core.envs.base import Env
from foresight_core.rollout import HFEngine, Rollout, RolloutEngine, SamplingParams, play_group
from foresight_core.tracking import NullTracker, Progress, Tracker
from foresight_core.storage import check_seal, seal
from foresight_core.types import Task

CHECKPOINT_FILE = "fc_rl_state.pt"


# ---------------------------------------------------------------------------------------------
# Rewards and advantages of played rollouts


@dataclass
class ScoredRollout:
    """A rollout's rewards, per episode and per step, and its per-token advantages."""

    rollout: Rollout
    task_score: float  # EM / F1 / verified
    r_episode: float  # R_E
    r_calib: list[float | None]  # per step; None where no confidence was stated
    r_ground: list[float | None]  # per step; None where no keywords were predicted
    a_step: list[float]  # A_S per step
    a_episode: float = 0.0
    a_wm: list[float | None] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)  # per response token


def score_rollout(r: Rollout, cfg: FCRLConfig) -> ScoredRollout:
    """R_E, and per step R_calib, R_ground and A_S (the step's confidence vs the episode outcome)."""
    if r.env != "math" and cfg.search_score == "f1" and "f1" in r.info:
        task_score = float(r.info["f1"])
    else:
        task_score = r.score
    outcome = float(r.success)
    futures = scoring.future_texts([s.action.content if s.action else "" for s in r.steps],
                                   [s.observation for s in r.steps])
    r_calib = [grpo.calibration_reward(s.confidence, outcome) if s.valid and s.confidence is not None else None
               for s in r.steps]
    r_ground = [scoring.grounding(s.keywords, fut) if s.valid and s.keywords else None
                for s, fut in zip(r.steps, futures)]
    a_step = grpo.step_advantages([s.confidence if s.valid else None for s in r.steps], outcome)
    return ScoredRollout(rollout=r, task_score=task_score, r_episode=grpo.episode_reward(task_score, r.format_ok,
                                                                                          cfg.format_weight),
                         r_calib=r_calib, r_ground=r_ground, a_step=a_step)


def compute_advantages(rollouts: Sequence[Rollout], cfg: FCRLConfig) -> list[ScoredRollout]:
    """Rewards -> group-normalised A_E and A_WM -> per-token advantages of every rollout."""
    scored = [score_rollout(r, cfg) for r in rollouts]
    # A_E: the G rollouts of a task form a group
    a_e = grpo.group_normalise([s.r_episode for s in scored], [s.rollout.group for s in scored],
                               cfg.std_normalise, cfg.adv_eps)
    # A_WM: every world-model step of a task's G rollouts forms a group
    use_wm = cfg.use_calibration or cfg.use_grounding
    wm_index = [(i, t) for i, s in enumerate(scored) for t in range(len(s.r_calib))
                if use_wm and s.rollout.steps[t].valid and s.rollout.steps[t].confidence is not None]
    r_wm = [grpo.world_model_reward(scored[i].r_calib[t], scored[i].r_ground[t], cfg.use_calibration,
                                    cfg.use_grounding) for i, t in wm_index]
    a_wm = grpo.group_normalise(r_wm, [scored[i].rollout.group for i, _ in wm_index], cfg.std_normalise, cfg.adv_eps)
    for s, a in zip(scored, a_e):
        s.a_episode = a
        s.a_wm = [None] * len(s.rollout.steps)
    for (i, t), a in zip(wm_index, a_wm):
        scored[i].a_wm[t] = a
    for s in scored:
        r = s.rollout
        omega = cfg.omega(r.env)
        a_pol = [grpo.policy_advantage(s.a_episode, a, omega) for a in s.a_step]
        s.advantages = grpo.token_advantages(len(r.response_ids), r.turn_spans, r.wm_mask, r.policy_mask,
                                             r.obs_mask, s.a_episode, s.a_wm, a_pol)
    return scored


# ---------------------------------------------------------------------------------------------
# The learner: log-probabilities of trained tokens and the clipped-surrogate update


@dataclass
class TrainItem:
    """One rollout as the learner sees it: prompt + response, and which response tokens are trained."""

    prompt_ids: list[int]
    response_ids: list[int]  # generated and observation tokens
    trained: list[int]  # indices into response_ids of the generated tokens (the loss's tokens)
    advantages: list[float]  # one per trained token
    seq: int  # index of the rollout in the step (sequence-level loss)
    old_logprobs: list[float] | None = None
    ref_logprobs: list[float] | None = None

    @property
    def targets(self) -> list[int]:
        return [self.response_ids[j] for j in self.trained]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def train_items(scored: Sequence[ScoredRollout]) -> list[TrainItem]:
    items = []
    for k, s in enumerate(scored):
        r = s.rollout
        keep = [j for j in range(len(r.response_ids)) if not r.obs_mask[j]]
        items.append(TrainItem(prompt_ids=r.prompt_ids, response_ids=r.response_ids, trained=keep,
                               advantages=[s.advantages[j] for j in keep], seq=k))
    return items


def micro_batches(items: Sequence[TrainItem], max_tokens: int) -> list[list[TrainItem]]:
    """Items sorted by length, cut into micro-batches whose padded size (rows x longest prompt + longest
    response) stays within ``max_tokens`` (a longer item goes alone). Sorting keeps padding small."""
    out: list[list[TrainItem]] = []
    cur: list[TrainItem] = []
    for it in sorted(items, key=len, reverse=True):
        rows = cur + [it]
        width = max(len(x.prompt_ids) for x in rows) + max(len(x.response_ids) for x in rows)
        if cur and len(rows) * width > max_tokens:
            out.append(cur)
            rows = [it]
        cur = rows
    if cur:
        out.append(cur)
    return out


def batch_logprobs(model: torch.nn.Module, batch: Sequence[TrainItem], temperature: float,
                   device: torch.device) -> torch.Tensor:
    """log pi(target) of every trained token of a micro-batch, as one flat (N,) tensor, in item order.

    Layout as the engine's: prompts left-padded to one column P, responses right-padded after it,
    position ids from the attention mask. Only the response columns go through the LM head
    (``logits_to_keep``), the vocabulary-sized part; the logit of response token j sits at column j
    of the kept block (which starts at the last prompt token). Padded rows of similar lengths beat one
    packed row here: on CPU, attention over a block-diagonal mask costs (sum of lengths)^2, not the
    sum of squares (3x slower measured on SmolLM2, 16 x 214 tokens).
    """
    P = max(len(it.prompt_ids) for it in batch)
    R = max(len(it.response_ids) for it in batch)
    ids = torch.zeros((len(batch), P + R), dtype=torch.long)  # padding: any id, masked out
    mask = torch.zeros((len(batch), P + R), dtype=torch.long)
    rows, cols, tgt = [], [], []
    for i, it in enumerate(batch):
        p, r = len(it.prompt_ids), len(it.response_ids)
        ids[i, P - p:P + r] = torch.tensor(it.prompt_ids + it.response_ids)
        mask[i, P - p:P + r] = 1
        rows += [i] * len(it.trained)
        cols += it.trained
        tgt += it.targets
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                   use_cache=False, logits_to_keep=R + 1).logits  # (B, R + 1, V): columns P - 1 .. P + R - 1
    logits = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float() / temperature
    return -torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=device), reduction="none")  # (N,)


def _flat(batch: Sequence[TrainItem], attr: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([x for it in batch for x in getattr(it, attr)], dtype=torch.float32, device=device)


@torch.no_grad()
def fill_logprobs(model: torch.nn.Module, items: Sequence[TrainItem], attr: str, cfg: FCRLConfig,
                  device: torch.device, autocast: Callable[[], Any]) -> None:
    """Set ``attr`` (old_logprobs / ref_logprobs) of every item with a no-grad pass."""
    for mb in micro_batches(items, cfg.micro_batch_tokens):
        with autocast():
            lp = batch_logprobs(model, mb, cfg.temperature, device).cpu().tolist()
        o = 0
        for it in mb:
            setattr(it, attr, lp[o:o + len(it.targets)])
            o += len(it.targets)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    _, world = _world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _rank_mean(m: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over the ranks that have it (ECE / Brier: the mean of the ranks' values)."""
    _, world = _world()
    if world == 1:
        return m
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, m)
    keys = {k for p in parts for k in p}
    out = {}
    for k in keys:
        xs = [p[k] for p in parts if k in p and not math.isnan(p[k])]
        out[k] = sum(xs) / len(xs) if xs else float("nan")
    return out


@dataclass
class UpdateStats:
    loss: float = 0.0
    loss_stats: grpo.LossStats = field(default_factory=lambda: grpo.LossStats(0, 0, 0, 0, 0))
    grad_norm: float = 0.0
    tokens: int = 0  # prompt + response tokens run through the model (padding not counted)
    optimizer_steps: int = 0
    skipped: int = 0  # rollouts with no gradient, not run through the model


def update_policy(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  items: list[TrainItem], cfg: FCRLConfig, device: torch.device, autocast: Callable[[], Any],
                  rng: random.Random) -> UpdateStats:
    """ppo_epochs x num_minibatches optimiser steps of the clipped surrogate over this step's items."""
    st = UpdateStats()
    on_policy = cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
    for _ in range(cfg.ppo_epochs):
        order = list(range(len(items)))
        if not on_policy:
            rng.shuffle(order)
        for m in range(cfg.num_minibatches):
            mini = [items[i] for i in order[m::cfg.num_minibatches]]
            n_tok, n_seq = _all_reduce([float(sum(len(it.targets) for it in mini)), float(len(mini))])
            _, world = _world()
            normaliser = (n_tok if cfg.loss_agg == "token" else n_seq) / world
            live = [it for it in mini
                    if not cfg.skip_zero_advantage or cfg.kl_coef > 0 or any(a != 0.0 for a in it.advantages)]
            st.skipped += len(mini) - len(live)
            mbs = micro_batches(live, cfg.micro_batch_tokens)
            # every rank must run the same number of backward passes (DDP all-reduces in each)
            n_mb = int(_all_reduce([float(len(mbs))], op="max")[0])
            optimizer.zero_grad(set_to_none=True)
            if n_mb == 0:
                continue
            for k in range(n_mb):
                mb, weight = (mbs[k], 1.0) if k < len(mbs) else ((mini or items)[:1], 0.0)  # a zero-weight stand-in
                sync = contextlib.nullcontext() if k == n_mb - 1 or not hasattr(ddp_model, "no_sync") \
                    else ddp_model.no_sync()
                with sync:
                    with autocast():
                        lp = batch_logprobs(ddp_model, mb, cfg.temperature, device)
                    old = lp.detach() if on_policy else _flat(mb, "old_logprobs", device)
                    ref = _flat(mb, "ref_logprobs", device) if cfg.kl_coef > 0 else None
                    seq_ids = torch.tensor([i for j, it in enumerate(mb) for i in [j] * len(it.targets)],
                                           device=device)
                    loss, ls = grpo.grpo_loss(lp, old, _flat(mb, "advantages", device), torch.ones_like(lp),
                                              cfg.clip_eps_low, cfg.clip_eps_high, ref, cfg.kl_coef, cfg.loss_agg,
                                              normaliser, seq_ids)
                    (loss * weight).backward()
                if weight:
                    st.loss += loss.item()
                    st.loss_stats = st.loss_stats + ls
                    st.tokens += sum(len(it) for it in mb)
            st.grad_norm = float(torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            st.optimizer_steps += 1
    return st


# ---------------------------------------------------------------------------------------------
# Metrics


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def rollout_metrics(scored: Sequence[ScoredRollout], prefix: str = "") -> dict[str, float]:
    """Reward components and advantages of a set of scored rollouts, with their episode metrics
    (``scoring.summarise_episodes``: success, format, grounding, calibration as ``calib/*``, how they ended)."""
    def ok(xs: Sequence[float | None]) -> list[float]:
        return [x for x in xs if x is not None]

    rs = [s.rollout for s in scored]
    m: dict[str, float] = {}
    for name, xs in (("reward/episode", [s.r_episode for s in scored]),
                     ("reward/task_score", [s.task_score for s in scored]),
                     ("reward/calibration", [x for s in scored for x in ok(s.r_calib)]),
                     ("reward/grounding", [x for s in scored for x in ok(s.r_ground)]),
                     ("adv/step", [x for s in scored for x in s.a_step]),
                     ("len/response_tokens", [float(r.generated_tokens) for r in rs]),
                     ("len/turns", [float(len(r.steps)) for r in rs])):
        m[f"{name}_mean"], m[f"{name}_std"] = _mean_std(xs)
    if rs:
        ep = scoring.summarise_episodes([scoring.episode_facts(r) for r in rs])
        for k in ("success_rate", "format_rate", "grounding_rate", "confidence_rate"):
            m[k] = ep[k]
        for k in ("ece", "brier"):
            if not math.isnan(ep[k]):
                m[f"calib/{k}"] = ep[k]
        m.update({k: v for k, v in ep.items() if k.startswith("finish/")})
    return {prefix + k: v for k, v in m.items()}


def sample_rows(scored: Sequence[ScoredRollout], tokenizer: Any, step: int, n: int) -> list[dict[str, Any]]:
    rows = []
    for s in scored[:n]:
        r = s.rollout
        rows.append({"step": step, "task_id": r.task.id, "env": r.env, "question": r.task.question,
                     "gold": "; ".join(r.task.answers), "success": r.success, "reward": round(s.r_episode, 4),
                     "format_ok": r.format_ok, "finish": r.finish, "turns": len(r.steps),
                     "confidences": [st.confidence for st in r.steps],
                     "response": tokenizer.decode(r.response_ids, skip_special_tokens=False)})
    return rows


def eval_subset(tasks: Sequence[Task], n: int) -> list[Task]:
    """``n`` of ``tasks`` at an even stride, so that every held-out set (search and maths alike) is in it."""
    return list(tasks[::max(1, len(tasks) // max(1, n))][:n])


def evaluate(engine: RolloutEngine, bridge: ChatBridge, make_env: Callable[[Task], Env], tasks: Sequence[Task],
             cfg: FCRLConfig, on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """One rollout per held-out task at the training temperature: success, ECE, Brier, grounding, format.
    ``on_progress(episodes done, episodes, turn)``: after every turn."""
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    rollouts = play_group(engine, bridge, make_env, tasks, 1, params, cfg.turn_format, cfg.max_turns,
                          cfg.max_context_tokens, on_progress=on_progress)
    return rollout_metrics([score_rollout(r, cfg) for r in rollouts])


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    step: int) -> Path:
    """Model, optimiser, learning-rate schedule and step, written through a temporary file (never half a checkpoint).

    Every random draw of step k (task sampling, token sampling, mini-batch order) is seeded from
    (seed, k, rank), so the step number is the whole RNG state a resume needs.
    """
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step}, tmp)
    seal(tmp)
    os.replace(tmp.with_name(tmp.name + ".sha256"), path / (CHECKPOINT_FILE + ".sha256"))
    os.replace(tmp, path / CHECKPOINT_FILE)
    return path / CHECKPOINT_FILE


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns the number of finished steps."""
    file = path / CHECKPOINT_FILE
    check_seal(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])
    except (RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError, EOFError) as e:
        raise RuntimeError(f"{file}: not a usable FC-RL checkpoint for this model ({e})") from e


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of everything random in one step on one rank."""
    return (seed * 1_000_003 + step) * 1009 + rank


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class FCRLResult:
    steps: int
    history: list[dict[str, float]]  # per-step metrics
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    checkpoint: Path | None


def train_fc_rl(cfg: FCRLConfig, model: torch.nn.Module, tokenizer: Any, train_tasks: Sequence[Task],
                make_env: Callable[[Task], Env], *, seed: int = 0, eval_tasks: Sequence[Task] = (),
                engine: RolloutEngine | None = None, bridge: ChatBridge | None = None, tracker: Tracker | None = None,
                checkpoint_dir: str | os.PathLike | None = None, device: torch.device | None = None,
                autocast_dtype: torch.dtype | None = None,
                on_checkpoint: Callable[[Path, int, dict[str, float]], None] | None = None) -> FCRLResult:
    """Run FC-RL for ``cfg.max_steps`` steps (resuming from ``checkpoint_dir`` when it holds a checkpoint).

    ``model`` is the FE-SFT policy (a transformers causal LM), trained in place. ``engine`` defaults to
    an ``HFEngine`` on the same module. ``on_checkpoint(path, step, metrics)`` is called after every
    checkpoint (the Ray Train adapter reports it). Returns the metric history and held-out evaluations.
    """
    if not train_tasks:
        raise ValueError("FC-RL needs at least one training task")
    rank, world = _world()
    device = device or next(model.parameters()).device
    tracker = tracker or NullTracker()
    progress = Progress.of(tracker)  # rank 0's share of the episodes (the other ranks have no tracker)
    bridge = bridge or ChatBridge(tokenizer)
    engine = engine or HFEngine(model, tokenizer, autocast_dtype, cfg.max_batch_sequences)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    ref_model = None
    if cfg.kl_coef > 0:  # the frozen starting policy
        import copy
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    start = 0
    if ckpt_dir and (ckpt_dir / CHECKPOINT_FILE).exists():
        start = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        if not engine.shares_weights:
            engine.load_weights(model.state_dict())
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    do_eval = bool(cfg.n_eval_tasks and eval_tasks)
    my_eval = list(eval_tasks)[:cfg.n_eval_tasks][rank::world]

    def run_eval(label: str) -> dict[str, float]:  # same seed every time, so before and after see the same draws
        progress.phase(label, total=len(my_eval), unit="episodes")
        torch.manual_seed(step_seed(seed, -1, rank))
        return _rank_mean(evaluate(engine, bridge, make_env, my_eval, cfg, progress.episodes()) if my_eval else {})

    eval_before = run_eval("held-out eval before") if do_eval and start == 0 else {}
    if eval_before:
        tracker.log_metrics({f"eval/{k}": v for k, v in eval_before.items()}, step=0)

    history: list[dict[str, float]] = []
    last_ckpt: Path | None = None
    progress.phase("train", total=cfg.max_steps, unit="steps", done=start)
    for step in range(start, cfg.max_steps):
        t_step = time.perf_counter()
        # -- sample this step's tasks (the same on every rank); each rank plays its share
        rng = random.Random(step_seed(seed, step))
        torch.manual_seed(step_seed(seed, step, rank))
        batch = [train_tasks[rng.randrange(len(train_tasks))] for _ in range(cfg.tasks_per_step)]
        my_tasks = batch[rank::world]

        # -- rollouts: G per task, all episodes batched turn by turn
        t0 = time.perf_counter()
        rollouts = play_group(engine, bridge, make_env, my_tasks, cfg.group_size, params, cfg.turn_format,
                              cfg.max_turns, cfg.max_context_tokens, on_progress=progress.episodes("rollouts"))
        rollout_s = time.perf_counter() - t0
        gen_tokens = sum(r.generated_tokens for r in rollouts)

        # -- rewards -> advantages -> per-token advantages
        scored = compute_advantages(rollouts, cfg)
        items = train_items(scored)

        # -- old / reference log-probs (only when needed)
        progress.update(detail="policy update")
        t1 = time.perf_counter()
        if not (cfg.ppo_epochs == 1 and cfg.num_minibatches == 1):
            fill_logprobs(model, items, "old_logprobs", cfg, device, autocast)
        if ref_model is not None:
            fill_logprobs(ref_model, items, "ref_logprobs", cfg, device, autocast)

        # -- clipped-surrogate update
        model.train()
        up = update_policy(ddp_model, optimizer, scheduler, items, cfg, device, autocast, rng)
        update_s = time.perf_counter() - t1

        # -- new weights to the engine (free when it shares the learner's module)
        if not engine.shares_weights:
            engine.load_weights(model.state_dict())

        # -- metrics
        m = rollout_metrics(scored)
        ls = up.loss_stats
        tok = max(ls.tokens, 1.0)
        m.update({"loss": up.loss, "clip_frac": ls.clipped / tok, "ratio_mean": ls.ratio / tok,
                  "approx_kl": ls.approx_kl / tok, "kl_ref": ls.ref_kl / tok, "grad_norm": up.grad_norm,
                  "lr": scheduler.get_last_lr()[0], "skipped_rollouts": float(up.skipped),
                  "perf/rollout_s": rollout_s, "perf/update_s": update_s,
                  "perf/rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
                  "perf/learner_tokens_per_s": up.tokens / max(update_s, 1e-9)})
        m = _rank_mean(m)
        m["perf/step_s"] = time.perf_counter() - t_step
        history.append(m)
        tracker.log_metrics(m, step=step + 1)
        if (step + 1) % cfg.sample_every == 0 or step == 0:
            tracker.log_table(sample_rows(scored, tokenizer, step + 1, cfg.samples_logged), "fc_rl/samples.json")
        if do_eval and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            tracker.log_metrics({f"eval/{k}": v for k, v in run_eval(f"held-out eval at step {step + 1}").items()},
                                step=step + 1)
            progress.phase("train", total=cfg.max_steps, unit="steps", done=step + 1)

        # -- checkpoint (rank 0 writes; every rank holds the same weights)
        if ckpt_dir and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps):
            if rank == 0:
                last_ckpt = save_checkpoint(ckpt_dir, model, optimizer, scheduler, step + 1)
            if world > 1:
                dist.barrier()
            if on_checkpoint:
                on_checkpoint(ckpt_dir, step + 1, m)
        progress.update(step + 1, detail="")

    eval_after = run_eval("held-out eval after") if do_eval else {}
    if eval_after:
        tracker.log_metrics({f"eval/{k}": v for k, v in eval_after.items()}, step=cfg.max_steps)
    return FCRLResult(steps=cfg.max_steps, history=history, eval_before=eval_before, eval_after=eval_after,
                      checkpoint=last_ckpt)


# ---------------------------------------------------------------------------------------------
# The stage's entry point: as ``sft.run_sft``, a config and references in, a saved model out


@dataclass
class FCRLRun:
    model_dir: Path | None  # the final model in Hugging Face format (rank 0; None on the other ranks)
    result: FCRLResult


def run_fc_rl(cfg: Any, train_tasks: Sequence[Task], out_dir: str | os.PathLike, *, eval_tasks: Sequence[Task] = (),
              init_model: str | None = None, tracker: Tracker | None = None,
              on_checkpoint: Callable[[Path, int, dict[str, float]], None] | None = None,
              resume_from: str | os.PathLike | None = None, device: torch.device | None = None) -> FCRLRun:
    """FC-RL of the ``PipelineConfig`` ``cfg``: loads the model (``init_model``, an HF folder, else
    ``cfg.model``) and its rollout engine (the learner's own module, or vLLM with ``fc_rl.engine: vllm``),
    trains with ``train_fc_rl`` and saves the final model to ``<out_dir>/model``.

    Checkpoints go to ``<out_dir>/checkpoints``; ``resume_from`` (a checkpoint folder, e.g. the one Ray
    Train hands back) is copied there first and training continues from its step.
    """
    import shutil

    from foresight_core.envs import env_for_task
    from foresight_core.models import compute_dtype, load_model, save_model

    rl: FCRLConfig = cfg.fc_rl
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, _ = _world()
    if device is None:
        use_cuda = rl.scaling.use_gpu and torch.cuda.is_available()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if resume_from is not None and Path(resume_from).resolve() != ckpt_dir.resolve():
        shutil.copytree(resume_from, ckpt_dir, dirs_exist_ok=True)
    model_cfg = cfg.model if init_model is None else cfg.model.saved(str(init_model), train=True)
    Progress.of(tracker).phase("loading the model")
    model, tokenizer = load_model(model_cfg, str(device), seed=cfg.seed)
    engine = None
    if rl.engine == "vllm":
        from foresight_core.vllm_engine import VLLMEngine
        init_path = model_cfg.name_or_path or str(save_model(model, tokenizer, out / "init_hf"))
        engine = VLLMEngine(init_path, gpu_memory_utilization=rl.vllm_gpu_memory_utilization,
                            max_model_len=rl.max_context_tokens, seed=cfg.seed + rank)
    result = train_fc_rl(rl, model, tokenizer, train_tasks, lambda t: env_for_task(t, cfg.envs), seed=cfg.seed,
                         eval_tasks=eval_tasks, engine=engine, tracker=tracker, checkpoint_dir=ckpt_dir, device=device,
                         autocast_dtype=compute_dtype(model_cfg, str(device)), on_checkpoint=on_checkpoint)
    model_dir = save_model(model, tokenizer, out / "model") if rank == 0 else None
    return FCRLRun(model_dir=model_dir, result=result)


def _task_files(source: str, storage: Any = None) -> tuple[str, list[str]]:
    """``(RL task file, held-out task files)`` of a corpus folder (by its manifest), or of one task file."""
    from foresight_core.capability import TASK_FILE_SUFFIXES, held_out_task_uris
    from foresight_core.storage import join_uri, load_manifest

    if source.endswith(TASK_FILE_SUFFIXES):
        return source, []
    manifest = load_manifest(source, storage)
    if manifest is None or "rl_tasks" not in manifest.get("datasets", {}):
        raise ValueError(f"{source}: neither a task file nor a complete corpus folder with an rl_tasks set")
    return join_uri(source, manifest["datasets"]["rl_tasks"]["file"]), held_out_task_uris(source, storage)


def main(argv: list[str] | None = None) -> int:
    """``python -m foresight_core.fc_rl --preset tiny --tasks CORPUS --out DIR``: FC-RL without Ray or MLflow."""
    import argparse
    import json

    from foresight_core.capability import read_tasks
    from foresight_core.config.load import load_config

    p = argparse.ArgumentParser(description="FC-RL without Ray or MLflow (resumes from --out)")
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tasks", required=True, help="a corpus folder (its rl_tasks and eval/* sets) or a task file")
    p.add_argument("--out", required=True, help="output folder: checkpoints/ and model/")
    p.add_argument("--init-model", default=None, help="HF folder to start from (the FE-SFT model; default: the config's)")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    try:
        train_uri, held_uris = _task_files(args.tasks, cfg.infra.storage)
        train = read_tasks(train_uri, cfg.infra.storage)
        held = eval_subset([t for u in held_uris for t in read_tasks(u, cfg.infra.storage)], cfg.fc_rl.n_eval_tasks)
    except ValueError as e:
        p.error(str(e))
    ckpt = Path(args.out) / "checkpoints"
    run = run_fc_rl(cfg, train, args.out, eval_tasks=held, init_model=args.init_model,
                    resume_from=ckpt if (ckpt / CHECKPOINT_FILE).exists() else None)
    print(json.dumps({"model_dir": str(run.model_dir), "steps": run.result.steps,
                      "eval_before": run.result.eval_before, "eval_after": run.result.eval_after,
                      "last": run.result.history[-1] if run.result.history else {}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
