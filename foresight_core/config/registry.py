"""After evaluation: the model registry and the champion alias."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from foresight_core.config.base import StrictModel


class RegistryConfig(StrictModel):
    enabled: bool = True
    """Register the pipeline's final model (FC-RL's, else FE-SFT's, else WM-AMT's) as a version in
    MLflow's Model Registry once it is evaluated; a run that trained no model registers nothing."""
    model_name: str | None = Field(default=None, min_length=1, max_length=200)
    """Name of the registered model (None: ``foresight-<name>``, the config's name)."""
    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    """The alias that marks the best version so far (``models:/<name>@champion``)."""
    promote_margin: float = Field(default=0.0, ge=0, le=1)
    """A new version takes the alias only when its mean score on the held-out tasks it shares with the
    champion's evaluation beats the champion's by more than this (a paired comparison, task by task)."""
    mode: Literal["direct", "planning"] = "direct"
    """Which evaluation mode's scores the comparison uses."""
