"""WM-AMT and FE-SFT: one causal-LM training loop (``foresight_core.sft``), two configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel


class ScalingConfig(StrictModel):
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model (CPU and GPU). fsdp: PyTorch FSDP2, parameters, gradients and
    optimiser state sharded over the workers (one unit per decoder layer), for models that do not fit one
    GPU; it also runs on CPU (gloo). WM-AMT and FE-SFT only (FC-RL refuses it). Checkpoints are the same
    files under either, so a run may resume under the other."""
    max_failures: int = Field(default=1, ge=0)
    """Ray FailureConfig: restarts from the last checkpoint before the stage fails."""
    cpus_per_worker: int | None = Field(default=None, ge=1)
    """CPUs Ray reserves for each worker, and its torch threads. None: the workers share the CPUs of the Ray
    nodes (one worker on a 2-core laptop gets both; see ``tasks.runtime.cpus_per_worker``)."""
    malloc_tuning: bool = True
    """Set ``GLIBC_TUNABLES`` (no mmap, no trim) in the workers' environment: glibc then reuses freed
    activation memory instead of returning it to the OS every step (measured ~1.5x bf16 throughput on CPU)."""


class SFTConfig(StrictModel):
    enabled: bool = True
    """Run this stage (off: the next stage starts from this stage's input model)."""
    loss_on: Literal["all", "assistant", "observation"] = "all"
    """all: next-token loss on every non-masked token (WM-AMT). assistant: assistant tokens only (FE-SFT).
    observation: observation tokens only, the environment's answer to each action (implicit world modelling,
    the IWM baseline of Early Experience, arXiv 2510.08558: predict s' from the history and a)."""
    train_on_observations: bool = False
    """WM-AMT only: include observation tokens in the loss (the paper never trains on them in SFT/RL)."""
    seq_len: int = Field(default=1024, ge=32)
    """Packed sequence length (laptop-corpus trajectories are ~500-1000 tokens: most fit whole)."""
    batch_size: int = Field(default=1, ge=1)
    """Packed sequences per micro-batch per worker (activation memory grows with it: ~1.3 GB per 1024
    tokens for SmolLM2-135M without activation checkpointing)."""
    grad_accum: int = Field(default=2, ge=1)
    """Micro-batches per optimiser step."""
    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=5, ge=0)
    """Linear warm-up steps before the cosine decay."""
    max_steps: int = Field(default=50, ge=1)
    """Optimiser steps."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient-norm clipping."""
    eval_every: int = Field(default=25, ge=1)
    """Steps between evaluations of the held-out loss."""
    eval_share: float = Field(default=0.1, ge=0, lt=1)
    """Share of the data held out for the evaluation loss."""
    checkpoint_every: int = Field(default=25, ge=1)
    """Steps between checkpoints (resume points)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept (Ray Train storage and local); older ones are deleted."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """The cosine decays from ``lr`` to ``lr * min_lr_ratio`` at ``max_steps``."""
    long_samples: Literal["split", "truncate"] = "split"
    """Samples longer than ``seq_len``: split into overlapping chunks (every target trained once, later
    chunks without the earlier context) or truncated to their first ``seq_len`` tokens. Both are counted."""
    turn_format: Literal["foresight", "state", "plain"] = "foresight"
    """How the corpus's turns are rendered: foresight, the whole world-model block where a step has one;
    state, its imagined roadmap alone (State-SFT: no keywords, no confidence); plain, no block (plain SFT).
    The format check plays in the same format."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, ~30% more compute."""
    eval_at_start: bool = True
    """Also measure the held-out losses before the first step (the baseline the stage must beat)."""
    max_eval_rows: int | None = Field(default=None, ge=1)
    """Cap on packed held-out rows per evaluation (None: all of them)."""
    loss_chunk: int = Field(default=1024, ge=16)
    """Target tokens per chunk of the fused LM-head cross-entropy (bounds the logits memory)."""
    format_check_tasks: int = Field(default=0, ge=0)
    """Format-capability check after the stage: held-out tasks (the corpus's eval/* sets, balanced across
    them) the final model plays once each on rank 0, in this stage's turn format; format adherence,
    success, keyword grounding and calibration (ECE, Brier) are logged as ``check/*``. 0: off."""
    format_check_temperature: float = Field(default=0.7, ge=0)
    """Sampling temperature of the check's free generation (0: greedy decoding)."""
    format_check_max_new_tokens: int = Field(default=256, ge=1)
    """Tokens the check generates per turn; a turn that has not ended by then counts as malformed."""
    format_check_max_turns: int | None = Field(default=None, ge=1)
    """Turns per check episode (None: each environment's own limit); an episode still going ends unanswered."""
    scaling: ScalingConfig = ScalingConfig()
    """Ray Train scaling."""

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.train_on_observations and self.loss_on != "all":
            raise ValueError("train_on_observations needs loss_on: all (assistant-only loss never sees observations)")
        return self


class RelabelConfig(SFTConfig):
    """Between FE-SFT and FC-RL, on demand (``relabel`` in ``stages``): the FE-SFT model's own Monte Carlo
    value replaces the corpus's q labels on part of the FE-SFT set, and a short SFT (these SFT fields) on
    the relabelled trajectories follows. ``foresight_core.relabel`` says how."""

    loss_on: Literal["all", "assistant", "observation"] = "assistant"
    """As FE-SFT: assistant tokens only."""
    max_steps: int = Field(default=8, ge=1)
    """Optimiser steps on the relabelled trajectories."""
    warmup_steps: int = Field(default=1, ge=0)
    """Linear warm-up steps before the cosine decay."""
    lr: float = Field(default=5e-5, gt=0)
    """Peak learning rate (the model is already in format: a gentle nudge of its stated q)."""
    eval_every: int = Field(default=8, ge=1)
    """Steps between evaluations of the held-out loss."""
    checkpoint_every: int = Field(default=8, ge=1)
    """Steps between checkpoints (resume points)."""
    n_trajectories: int = Field(default=16, ge=1)
    """Annotated FE-SFT trajectories relabelled (a seeded draw); each annotated step t is one start state."""
    rollouts_per_step: int = Field(default=4, ge=1)
    """Episodes the model plays from each start state: q_t becomes their success rate (k / n)."""
    temperature: float = Field(default=0.7, gt=0)
    """Sampling temperature of those episodes (FC-RL's, so q describes the policy RL will sample)."""
    max_turns: int | None = Field(default=None, ge=1)
    """Turn limit of an episode, the replayed prefix included (None: the environment's own)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Tokens per generated turn; an unfinished turn is malformed and its episode fails."""
    max_context_tokens: int = Field(default=4096, ge=64)
    """Prompt plus response tokens of one episode, the replayed prefix included."""
    rollout_batch: int = Field(default=32, ge=1)
    """Episodes played together (their key-value caches live together: memory grows with it)."""

    @model_validator(mode="after")
    def _foresight_only(self) -> "RelabelConfig":
        if self.turn_format != "foresight":
            raise ValueError("relabel.turn_format must be foresight: q is stated only in the foresight format")
        return self
