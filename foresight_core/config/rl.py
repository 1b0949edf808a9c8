"""FC-RL: foresight-conditioned GRPO. (Owned by the RL stage.)

The baselines of the paper's table are this config with terms switched off:
plain GRPO = ``use_calibration=False, use_grounding=False, omega_search=omega_math=0``;
no grounding = ``use_grounding=False``; omega = 0 = ``omega_search=omega_math=0``;
RL without foresight (SFT & RL) = ``turn_format: plain``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel
from foresight_core.config.train import ScalingConfig


class FCRLConfig(StrictModel):
    enabled: bool = True
    """Run this stage."""
    group_size: int = Field(default=4, ge=2)
    """G: rollouts per task."""
    tasks_per_step: int = Field(default=4, ge=1)
    """Tasks per GRPO step (over all workers)."""
    max_steps: int = Field(default=20, ge=1)
    """GRPO steps."""
    lr: float = Field(default=1e-5, gt=0)
    """Learning rate (AdamW, constant after warm-up)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear learning-rate warm-up, in optimiser steps."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient-norm clipping."""

    # -- rollouts
    turn_format: Literal["foresight", "state", "plain", "raw"] = "foresight"
    """foresight: every turn must carry the world-model block then think/action. state: the imagined roadmap
    alone then think/action (State-SFT & RL; its tokens get the episode advantage). plain: think/action only
    (the no-foresight baselines). Only foresight states a confidence and keywords, so the calibration and
    grounding rewards and omega act in that format alone. raw: one turn whose whole text is the answer (single-turn GRPO, the benchmark)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Rollout engine: Hugging Face generate (CPU; samples from the learner's own module) or vLLM (GPU; weights
    synced after every step)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; the learner's log-probabilities use the same temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Tokens generated per turn; a turn that does not end by then is malformed (format reward 0)."""
    max_turns: int | None = Field(default=None, ge=1)
    """Turn limit of an episode (None: the environment's own)."""
    max_context_tokens: int = Field(default=4096, ge=32)
    """Prompt plus response tokens of one rollout; an episode that would pass it ends unfinished."""
    max_batch_sequences: int = Field(default=64, ge=1)
    """Most sequences the HF engine generates in one batch (memory bound); vLLM schedules its own."""
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, lt=1)
    """vLLM: share of GPU memory for weights and KV cache (the learner shares the GPU)."""

    # -- rewards
    search_score: Literal["em", "f1"] = "em"
    """Task score of a search answer in R_E: exact match or token F1."""
    format_weight: float = Field(default=0.1, ge=0)
    """R_E = task score + format_weight * format_ok (every turn well formed)."""
    use_calibration: bool = True
    """R_calib = I - (q - I)^2 in the world-model reward."""
    use_grounding: bool = True
    """R_ground (share of keywords found in the real future) in the world-model reward."""
    omega_search: float = Field(default=0.2, ge=0)
    """omega: weight of the step advantage A_S in the policy advantage, search tasks."""
    omega_math: float = Field(default=0.1, ge=0)
    """omega for maths tasks."""
    std_normalise: bool = True
    """Divide group-centred rewards by the group's std (GRPO); off: centring only (Dr.GRPO)."""
    adv_eps: float = Field(default=1e-6, gt=0)
    """eps in (R - mean) / (std + eps)."""

    # -- loss and update
    clip_eps_low: float = Field(default=0.2, gt=0, lt=1)
    """PPO clip: ratio floor 1 - clip_eps_low."""
    clip_eps_high: float = Field(default=0.2, gt=0)
    """PPO clip: ratio ceiling 1 + clip_eps_high (DAPO's clip-higher uses 0.28)."""
    kl_coef: float = Field(default=0.0, ge=0)
    """Weight of the k3 KL to the frozen starting model; 0 keeps no reference model (saves a forward)."""
    loss_agg: Literal["token", "sequence"] = "token"
    """token: mean over all trained tokens of the mini-batch (DAPO). sequence: mean over sequences of their
    token means (the GRPO paper)."""
    ppo_epochs: int = Field(default=1, ge=1)
    """Passes over each step's rollouts."""
    num_minibatches: int = Field(default=1, ge=1)
    """Optimiser steps per pass; 1 epoch and 1 mini-batch is on-policy (old log-probs = current, no extra forward)."""
    skip_zero_advantage: bool = True
    """Do not run rollouts whose trained tokens all have advantage 0 through the learner when there is no KL
    term: their gradient is exactly 0 (they still count in the token mean). Off: every rollout is run (benchmarks)."""
    micro_batch_tokens: int = Field(default=4096, ge=64)
    """Tokens per forward/backward, padding included (rows x longest row); gradients accumulate over micro-batches."""

    # -- bookkeeping
    sample_every: int = Field(default=5, ge=1)
    """Steps between tables of sample rollouts."""
    samples_logged: int = Field(default=4, ge=1)
    """Rollouts per sample table."""
    checkpoint_every: int = Field(default=10, ge=1)
    """Steps between checkpoints (model, optimiser, step, RNG): resume points."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Ray Train checkpoints kept (the latest ones)."""
    eval_every: int = Field(default=0, ge=0)
    """Steps between held-out evaluations (success, ECE, Brier, grounding, format); 0: before and after only."""
    n_eval_tasks: int = Field(default=16, ge=0)
    """Held-out tasks per evaluation (one rollout each at the training temperature); 0: no evaluation."""
    scaling: ScalingConfig = ScalingConfig()
    """Ray Train scaling of the learner."""

    @model_validator(mode="after")
    def _checks(self) -> "FCRLConfig":
        if self.engine == "vllm" and not self.scaling.use_gpu:
            raise ValueError("fc_rl.engine 'vllm' needs fc_rl.scaling.use_gpu: true")
        if self.turn_format == "raw" and self.max_turns not in (None, 1):
            raise ValueError("fc_rl.turn_format 'raw' is single-turn: leave max_turns unset or 1")
        if self.scaling.strategy == "fsdp":
            raise ValueError("fc_rl.scaling.strategy 'fsdp' is not supported: the learner's own (unsharded) "
                             "module generates the rollouts (engine 'hf') and feeds the vLLM weight sync; use 'ddp'")
        return self

    def omega(self, env: str) -> float:
        """omega of an environment ("search" or a search benchmark -> omega_search, "math" -> omega_math)."""
        return self.omega_math if env == "math" else self.omega_search
