"""The pipeline config: one model that is the Prefect flow's parameter, the CLI's and every preset's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel
from foresight_core.config.corpus import CorpusConfig
from foresight_core.config.envs import EnvsConfig
from foresight_core.config.evaluation import EvalConfig
from foresight_core.config.infra import InfraConfig
from foresight_core.config.model import ModelConfig
from foresight_core.config.registry import RegistryConfig
from foresight_core.config.serve import ServeConfig
from foresight_core.config.rl import FCRLConfig
from foresight_core.config.train import RelabelConfig, SFTConfig

STAGES = ("corpus", "wm_amt", "fe_sft", "relabel", "fc_rl", "eval")  # pipeline order
Stage = Literal["corpus", "wm_amt", "fe_sft", "relabel", "fc_rl", "eval"]
DEFAULT_STAGES = ["corpus", "wm_amt", "fe_sft", "fc_rl", "eval"]  # the method; relabel only where asked


class PipelineConfig(StrictModel):
    name: str = "laptop"
    """Name of this configuration (the preset's name); a tag on every MLflow run."""
    seed: int = 0
    """Global seed: task sampling, noise, training order."""
    work_dir: str = "./foresight-work"
    """Root of every output: a local path or ``s3://bucket/prefix``."""
    stages: list[Stage] = DEFAULT_STAGES
    """Stages that ``foresight run`` executes, in pipeline order (``relabel``, between FE-SFT and FC-RL, is
    not one of the default)."""
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
    relabel: RelabelConfig = RelabelConfig()
    """Stage 2b (when in ``stages``): q re-labelled with the FE-SFT model's own rollouts, then a short SFT."""
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

    @model_validator(mode="after")
    def _stage_order(self) -> "PipelineConfig":
        if [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ValueError(f"stages must be distinct and in pipeline order {list(STAGES)}, got {list(self.stages)}")
        if "relabel" in self.stages and "fe_sft" not in self.stages:
            raise ValueError("stages: relabel needs fe_sft before it (it relabels the FE-SFT set with that model)")
        return self
