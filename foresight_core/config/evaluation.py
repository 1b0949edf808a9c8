"""Benchmark evaluation. (Owned by the evaluation stage.)"""

from __future__ import annotations

from pydantic import Field

from foresight_core.config.base import StrictModel


class EvalConfig(StrictModel):
    enabled: bool = True
    """Run evaluation."""
    max_tasks: int | None = Field(default=None, ge=1)
    """Evaluate at most this many tasks per benchmark (None: all held-out tasks)."""
    samples_per_task: int = Field(default=1, ge=1)
    """k for mean@k / pass@k."""
