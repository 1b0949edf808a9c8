"""FC-RL: foresight-conditioned GRPO. (Owned by the RL stage.)"""

from __future__ import annotations

from pydantic import Field

from foresight_core.config.base import StrictModel
from foresight_core.config.train import ScalingConfig


class FCRLConfig(StrictModel):
    enabled: bool = True
    """Run this stage."""
    group_size: int = Field(default=4, ge=2)
    """G: rollouts per task."""
    tasks_per_step: int = Field(default=4, ge=1)
    """Tasks per GRPO step."""
    max_steps: int = Field(default=20, ge=1)
    """GRPO steps."""
    lr: float = Field(default=1e-5, gt=0)
    """Learning rate."""
    omega_search: float = Field(default=0.2, ge=0)
    """omega: weight of the step advantage A_S in the policy advantage, search tasks."""
    omega_math: float = Field(default=0.1, ge=0)
    """omega for maths tasks."""
    scaling: ScalingConfig = ScalingConfig()
    """Ray Train scaling of the learner."""
