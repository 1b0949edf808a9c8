"""The ablation table of METHOD.md as data: each row is the pipeline with some stages and overrides.

One flow run (``foresight ablate``) trains and evaluates every row; rows share finished stages
(the corpus always, WM-AMT and FE-SFT wherever their config and inputs agree), so the table costs
far less than its rows run one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from foresight_core.config.base import StrictModel
from foresight_core.config.load import ConfigError, _format_validation_error, set_path, validate
from foresight_core.config.pipeline import PipelineConfig, Stage

ABLATION_DIR = Path(__file__).resolve().parent / "ablations"  # package data


class Variant(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Short name of the row (a tag and a metric prefix in MLflow)."""
    paper_row: str = ""
    """The row of the paper's table this variant reproduces."""
    changes: str = ""
    """What this row changes against the full method, in words (shown in the table and the plan)."""
    stages: list[Stage]
    """Stages this row runs, in pipeline order (corpus and eval are always wanted)."""
    overrides: dict[str, Any] = {}
    """Dotted config paths and values applied on top of the base config (as ``--set``: a mapping value
    changes only the fields it names)."""
    plain_twin: str | None = None
    """The row with the same recipe but no world-model spans: this row's token overhead of foresight is
    its tokens per episode against the twin's (left blank when the twin is not run)."""


class AblationConfig(StrictModel):
    variants: list[Variant]
    """The rows of the table."""
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    """Seeds every row runs at (``seed``: its corpus draw, training order and sampling); the table shows the
    mean over seeds and tasks with a bootstrap interval over both."""
    overrides: dict[str, Any] = {}
    """Dotted config paths and values every row takes before its own ``overrides`` (a row's own value wins):
    what the table as a whole changes against a single pipeline run."""
    lanes: int = Field(default=1, ge=1)
    """How many (row, seed) pipelines run at once. On a local Ray each stage then reserves its share of the
    CPUs (``infra.ray.cpus_per_stage`` = CPUs / lanes): on 2 cores, two stages on one thread each decode ~1.3x
    faster than one on two (``benchmarks/concurrent_stages.py``), and one row's start-up overlaps the other's
    work. On a cluster, rows run side by side as far as its resources hold them. Rows that need the same
    unfinished stage never train it twice: the second waits for it and reuses it (``tasks.stage``)."""
    reference: str = "full"
    """The row every other row is compared with, paired on the same (seed, task) cells."""
    level: float = Field(default=0.95, gt=0, lt=1)
    """Confidence level of the intervals."""
    n_boot: int = Field(default=2000, ge=100)
    """Bootstrap draws per interval."""

    @model_validator(mode="after")
    def _unique_names(self) -> "AblationConfig":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not names:
            raise ValueError("an ablation needs at least one variant")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self


def load_ablation(name_or_path: str) -> AblationConfig:
    """A table from ``foresight_core/config/ablations/<name>.yaml`` or a YAML file path."""
    path = Path(name_or_path)
    if not path.exists():
        path = ABLATION_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in ABLATION_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown ablation table {name_or_path!r}; tables: {known}")
    try:
        table = AblationConfig.model_validate(yaml.safe_load(path.read_text()) or {})
        names = {v.name for v in table.variants}
        for v in table.variants:  # a subset (``--only``) may leave a twin out; the file may not
            if v.plain_twin is not None and v.plain_twin not in names:
                raise ConfigError(f"{path}: variant {v.name}: plain_twin {v.plain_twin!r} is not a row of the table")
        return table
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def apply_variant(cfg: PipelineConfig, variant: Variant,
                  table_overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The base config with the table's overrides, then the variant's stages and overrides; a bad override
    names the field."""
    data = cfg.model_dump(mode="json")
    for name in ("key", "secret"):  # the JSON dump masks credentials: carry the real ones over
        value = getattr(cfg.infra.storage, name)
        data["infra"]["storage"][name] = value.get_secret_value() if value is not None else None
    data["stages"] = list(variant.stages)
    data["name"] = f"{cfg.name}-{variant.name}"
    for dotted, value in [*(table_overrides or {}).items(), *variant.overrides.items()]:
        set_path(data, dotted, value)
    return validate(data, f"ablation variant {variant.name}")


def row_configs(cfg: PipelineConfig, table: AblationConfig,
                seeds: list[int] | None = None) -> list[tuple[Variant, int, PipelineConfig]]:
    """Every (row, seed) of the table as its pipeline config, seed-major (all rows of seed 0 first, so the
    first seed's table is complete early); a bad override raises ``ConfigError`` naming it, before any work."""
    return [(v, seed, apply_variant(cfg.model_copy(update={"seed": seed}), v, table.overrides))
            for seed in (table.seeds if seeds is None else seeds) for v in table.variants]
