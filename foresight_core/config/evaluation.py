"""Benchmark evaluation: held-out tasks played by a trained model, plus test-time planning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel


class EvalConfig(StrictModel):
    enabled: bool = True
    """Run evaluation."""
    max_tasks: int | None = Field(default=None, ge=1)
    """Evaluate at most this many tasks per benchmark (None: all held-out tasks)."""
    samples_per_task: int = Field(default=1, ge=1)
    """k for mean@k / pass@k (the paper reports maths as mean@30 and pass@30)."""
    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature; 0 is greedy (one answer per task: samples_per_task > 1 needs temperature > 0)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling (temperature > 0)."""
    max_new_tokens: int = Field(default=256, ge=8)
    """Tokens per turn."""
    max_turns: int | None = Field(default=None, ge=1)
    """Turn limit of an episode (None: the environment's own, e.g. ``envs.search_world.max_turns``)."""
    max_context_tokens: int = Field(default=4096, ge=64)
    """Prompt plus response tokens of one episode."""
    turn_format: Literal["foresight", "state", "plain"] = "foresight"
    """foresight: the model must write the world-model block each turn; state: the imagined roadmap alone then
    think/action (State-SFT); plain: think/action only (baselines). Confidence metrics need foresight."""
    plan_candidates: int = Field(default=4, ge=0)
    """Test-time planning with the internal world model: at every turn sample K candidate turns and act on the
    well-formed one with the highest verbalised confidence; reported beside the plain run. 0 or 1: off."""
    plan_temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the K candidate plans."""
    batch_size: int = Field(default=32, ge=1)
    """Episodes played together (one batched generate per turn)."""
    num_actors: int = Field(default=1, ge=1)
    """Ray Data actors that each hold one copy of the model."""
    engine: Literal["hf", "vllm"] = "hf"
    """Rollout engine: Hugging Face generate (CPU) or vLLM (GPU)."""
    sample_rows: int = Field(default=20, ge=0)
    """Episodes per benchmark kept as a table artifact."""

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> "EvalConfig":
        if self.samples_per_task > 1 and self.temperature == 0:
            raise ValueError(f"eval.samples_per_task {self.samples_per_task} needs eval.temperature > 0: greedy "
                             "decoding (temperature 0) gives every sample the same answer, so pass@k = mean@k")
        return self
