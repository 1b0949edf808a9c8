"""Shared pieces of every config: the strict base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; field docstrings become descriptions (the Prefect UI shows them)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              protected_namespaces=())
