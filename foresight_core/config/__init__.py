"""Pydantic configs: one per stage, one for the pipeline. Imports no torch, Ray, Prefect or MLflow."""

from foresight_core.config.base import StrictModel
from foresight_core.config.corpus import CorpusConfig, ExpertNoiseConfig, LLMPolicyConfig
from foresight_core.config.envs import (BenchmarkSource, EnvsConfig, MathConfig, SandboxConfig, SearchQAConfig,
                                        SearchWorldConfig)
from foresight_core.config.evaluation import EvalConfig
from foresight_core.config.infra import InfraConfig, PrefectConfig, RayConfig, StorageConfig, TrackingConfig
from foresight_core.config.load import ConfigError, dump_config, list_presets, load_config, parse_override
from foresight_core.config.model import LoRAConfig, ModelConfig
from foresight_core.config.pipeline import STAGES, PipelineConfig
from foresight_core.config.registry import RegistryConfig
from foresight_core.config.rl import FCRLConfig
from foresight_core.config.train import ScalingConfig, SFTConfig

__all__ = [
    "StrictModel", "CorpusConfig", "ExpertNoiseConfig", "LLMPolicyConfig", "BenchmarkSource", "EnvsConfig",
    "MathConfig", "SandboxConfig", "SearchQAConfig", "SearchWorldConfig", "EvalConfig", "InfraConfig",
    "PrefectConfig", "RayConfig", "StorageConfig", "TrackingConfig", "ConfigError", "dump_config", "list_presets",
    "load_config", "parse_override", "LoRAConfig", "ModelConfig", "STAGES", "PipelineConfig", "FCRLConfig",
    "RegistryConfig", "ScalingConfig", "SFTConfig",
]
