"""The pipeline config: one model that is the Prefect flow's parameter, the CLI's and every preset's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from foresight_core.config.base import StrictModel
from foresight_core.config.corpus import CorpusConfig
from foresight_core.config.envs import EnvsConfig
from foresight_core.config.evaluation import EvalConfig
from foresight_core.config.infra import InfraConfig
from foresight_core.config.model import ModelConfig
from foresight_core.config.registry import RegistryConfig
from foresight_core.config.serve import ServeConfig
from foresight_core.config.rl import FCRLConfig
from foresight_core.config.train import SFTConfig

STAGES = ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval")
Stage = Literal["corpus", "wm_amt", "fe_sft", "fc_rl", "eval"]


class PipelineConfig(StrictModel):
    name: str = "laptop"
    """Name of this configuration (the preset's name); a tag on every MLflow run."""
    seed: int = 0
    """Global seed: task sampling, noise, training order."""
    work_dir: str = "./foresight-work"
    """Root of every output: a local path or ``s3://bucket/prefix``."""
    stages: list[Stage] = list(STAGES)
    """Stages that ``foresight run`` executes, in pipeline order."""
    infra: InfraConfig = InfraConfig()
    """Tracking, Ray, Prefect and storage."""
    envs: EnvsConfig = EnvsConfig()
    """Environments and benchmarks."""
    model: ModelConfig = ModelConfig()
    """The base model every stage starts from."""
    corpus: CorpusConfig = CorpusConfig()
    """Stage 0: corpus construction."""
    wm_amt: SFTConfig = SFTConfig(loss_on="all")
    """Stage 1: world-model agentic mid-training."""
    fe_sft: SFTConfig = SFTConfig(loss_on="assistant")
    """Stage 2: format-eliciting SFT."""
    fc_rl: FCRLConfig = FCRLConfig()
    """Stage 3: foresight-conditioned GRPO."""
    eval: EvalConfig = EvalConfig()
    """Benchmark evaluation."""
    registry: RegistryConfig = RegistryConfig()
    """After evaluation: the final model's version in MLflow's Model Registry, and its promotion."""
    serve: ServeConfig = ServeConfig()
    """The registered agent: abstention, turn and planning defaults and limits of its requests."""
    num_threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads per process (None: torch's default)."""
