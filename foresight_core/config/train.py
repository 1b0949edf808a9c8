"""WM-AMT and FE-SFT: one causal-LM training loop, two configs. (Owned by the training stage.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from foresight_core.config.base import StrictModel


class ScalingConfig(StrictModel):
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp everywhere; fsdp (GPUs) for models that do not fit one device."""
    max_failures: int = Field(default=1, ge=0)
    """Ray FailureConfig: restarts from the last checkpoint before the stage fails."""


class SFTConfig(StrictModel):
    enabled: bool = True
    """Run this stage (off: the next stage starts from this stage's input model)."""
    loss_on: Literal["all", "assistant"] = "all"
    """all: next-token loss on every non-masked token (WM-AMT). assistant: assistant tokens only (FE-SFT)."""
    train_on_observations: bool = False
    """WM-AMT only: include observation tokens in the loss (the paper never trains on them in SFT/RL)."""
    seq_len: int = Field(default=512, ge=32)
    """Packed sequence length."""
    batch_size: int = Field(default=4, ge=1)
    """Packed sequences per micro-batch per worker."""
    grad_accum: int = Field(default=1, ge=1)
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
    scaling: ScalingConfig = ScalingConfig()
    """Ray Train scaling."""
